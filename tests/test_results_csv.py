"""benchmarks/results_csv.py: rows with new columns widen the header instead of misaligning the file."""
import csv
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import results_csv  # noqa: E402


def test_new_columns_widen_the_header(tmp_path, monkeypatch):
    monkeypatch.setattr(results_csv, "RESULTS", tmp_path)
    results_csv.append_rows("r.csv", [{"a": 1, "b": 2}])
    results_csv.append_rows("r.csv", [{"a": 3, "c": 4}])
    results_csv.append_rows("r.csv", [{"a": 5, "b": 6, "c": 7}])
    with (tmp_path / "r.csv").open(newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == ["a", "b", "c"]
        assert list(reader) == [{"a": "1", "b": "2", "c": ""}, {"a": "3", "b": "", "c": "4"},
                                {"a": "5", "b": "6", "c": "7"}]
    assert [p.name for p in tmp_path.iterdir()] == ["r.csv"]  # no scratch file left
