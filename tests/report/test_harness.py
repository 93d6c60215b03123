"""`minidisc eval` (lm-evaluation-harness): the built-in local tasks, and equal numbers to the `lm_eval` command
line on the same per-layer export and tasks."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import MINIDISC, minidisc_forked

import engine
from engine.models.loading import load_tokenizer
from engine.report.harness import CLOZE_CHOICE, CLOZE_CONTEXT, continuation_fits, scores, write_builtin_tasks

pytest.importorskip("lm_eval")
LM_EVAL = str(Path(sys.executable).parent / "lm_eval")


def _paragraphs(corpus) -> list[str]:
    return [p for p in corpus["dev"].read_text().split("\n\n") if p.strip()]


def test_cloze_items_hold_the_true_continuation(corpus, tmp_path):
    texts = _paragraphs(corpus)
    folder = write_builtin_tasks(texts, tmp_path / "tasks")
    items = [json.loads(line) for line in (folder / "minidisc_cloze.jsonl").read_text().splitlines()]
    long_docs = [" ".join(t.split()).split() for t in texts if len(t.split()) >= CLOZE_CONTEXT + CLOZE_CHOICE]
    assert len(items) == min(len(long_docs), 200) >= 4
    for item, words in zip(items, long_docs):
        assert item["context"] == " ".join(words[:CLOZE_CONTEXT])
        assert item["choices"][item["answer"]] == " ".join(words[CLOZE_CONTEXT:CLOZE_CONTEXT + CLOZE_CHOICE])
        assert len(item["choices"]) == 4
    assert {item["answer"] for item in items} == {0, 1, 2, 3}  # the answer's position is shuffled
    again = write_builtin_tasks(texts, tmp_path / "again")
    assert (again / "minidisc_cloze.jsonl").read_text() == (folder / "minidisc_cloze.jsonl").read_text()


@pytest.mark.slow
def test_cloze_continuations_longer_than_a_models_positions_are_left_out(pruned_dirs, corpus, tmp_path):
    """lm_eval asserts on a continuation longer than the model's positions: such items are left out (not the run
    failing after training), and only those."""
    model = tmp_path / "short-context"
    engine.export(pruned_dirs["llama_gqa"], 0.5, model)
    texts = _paragraphs(corpus)
    items = [json.loads(line) for line in
             (write_builtin_tasks(texts, tmp_path / "all") / "minidisc_cloze.jsonl").read_text().splitlines()]
    tokenizer = load_tokenizer(model)
    longest = sorted(max(len(tokenizer(f"{item['context']} {c}", add_special_tokens=False).input_ids)
                         - len(tokenizer(item["context"], add_special_tokens=False).input_ids)
                         for c in item["choices"]) for item in items)
    positions = longest[len(longest) // 2]  # about half the items fit
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "max_position_embeddings": positions}))
    fits = continuation_fits({"m": str(model)})
    kept = write_builtin_tasks(texts, tmp_path / "fit", fits=fits) / "minidisc_cloze.jsonl"
    assert len(kept.read_text().splitlines()) == sum(n <= positions for n in longest) < len(items)
    result = engine.evaluate_tasks({"m": model}, ["minidisc_cloze"], texts=texts, limit=8)  # asserted before
    assert 0 <= result["models"]["m"]["minidisc_cloze"]["acc"] <= 1


@pytest.mark.slow
def test_minidisc_eval_equals_the_lm_eval_command_line(pruned_dirs, corpus, tmp_path):
    model = tmp_path / "student"
    engine.export(pruned_dirs["llama_gqa"], 0.5, model)  # per-layer widths: the checkpoint's own model class
    tasks = write_builtin_tasks(_paragraphs(corpus), tmp_path / "tasks")
    ours = subprocess.run([MINIDISC, "eval", model, "--tasks", "minidisc_ppl", "minidisc_cloze", "--include", tasks,
                           "--limit", "20", "--out", tmp_path / "ours.json"], capture_output=True, text=True,
                          timeout=600)
    assert ours.returncode == 0, ours.stderr[-3000:]
    assert "minidisc_cloze acc" in ours.stdout
    theirs = subprocess.run([LM_EVAL, "--model", "hf", "--model_args",
                             f"pretrained={model},dtype=float32,trust_remote_code=True", "--tasks",
                             "minidisc_ppl,minidisc_cloze", "--include_path", tasks, "--limit", "20", "--device",
                             "cpu", "--batch_size", "8", "--output_path", tmp_path / "theirs"],
                            capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert theirs.returncode == 0, theirs.stderr[-3000:]
    results = json.loads(next((tmp_path / "theirs").glob("*/results_*.json")).read_text())["results"]
    mine = json.loads((tmp_path / "ours.json").read_text())["models"][str(model)]
    assert mine == scores(results)
    api = engine.evaluate_tasks({"student": model}, ["minidisc_ppl", "minidisc_cloze"], include=tasks, limit=20)
    assert api == {"tasks": ["minidisc_ppl", "minidisc_cloze"], "models": {"student": mine}}  # the Python API
    assert set(mine["minidisc_ppl"]) == {"word_perplexity", "byte_perplexity", "bits_per_byte"}
    assert 0 <= mine["minidisc_cloze"]["acc"] <= 1


@pytest.mark.slow
def test_eval_errors_are_one_line(pruned_dirs, tmp_path):
    for args, message in (([pruned_dirs["opt"], "--tasks", "no_such_task"], "unknown lm-eval task(s) no_such_task"),
                          ([tmp_path, "--tasks", "minidisc_ppl"], "not a Hugging Face checkpoint folder"),
                          ([pruned_dirs["opt"], "--tasks", "minidisc_ppl"], "minidisc_ppl is made of a text: give "
                                                                            "--text FILE")):
        result = subprocess.run([MINIDISC, "eval", *map(str, args)], capture_output=True, text=True, timeout=300)
        assert result.returncode == 2 and result.stderr.strip().splitlines()[-1].startswith("minidisc: error: ")
        assert message in result.stderr, result.stderr[-2000:]


def _local_task(folder: Path, data: Path) -> Path:
    """A task YAML of the user's reading a local jsonl (the way to run a standard task offline)."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {"task": "local_cloze", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
              "test_split": "test", "output_type": "multiple_choice", "doc_to_text": "{{context}}",
              "doc_to_choice": "{{choices}}", "doc_to_target": "answer", "metric_list": [{"metric": "acc"}]}
    (folder / "local_cloze.yaml").write_text(json.dumps(config) + "\n")
    return folder


@pytest.mark.slow
def test_eval_tasks_and_their_data_are_checked_before_anything_runs(pruned_dirs, corpus, tmp_path, monkeypatch):
    """Offline (no Hub), the dry run and `minidisc eval` refuse a misspelt task and a task whose data set is not
    on this machine in one line; a task of --eval-include reading a local file passes the dry run."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    rows = [{"context": "a b c", "choices": ["d", "e", "f", "g"], "answer": 0}] * 4
    (tmp_path / "cloze.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    good, bad = _local_task(tmp_path / "good", tmp_path / "cloze.jsonl"), _local_task(tmp_path / "bad", tmp_path / "no")
    dry = ["compress", "--teacher", pruned_dirs["llama_gqa"], "--data", corpus["jsonl"], "--dev-data", corpus["dev"],
           "--out", tmp_path / "out", "--dry-run", "--eval-tasks"]
    cases = [(dry + ["hellaswagg"], 2, "unknown lm-eval task(s) hellaswagg"),
             (dry + ["hellaswag"], 2, "lm-eval task hellaswag: its data could not be loaded (Couldn't reach "),
             (dry + ["local_cloze", "--eval-include", bad], 2, "lm-eval task local_cloze: its data could not be"),
             (dry + ["local_cloze", "--eval-include", good], 0, "evaluation tasks local_cloze and their data"),
             (["eval", pruned_dirs["llama_gqa"], "--tasks", "hellaswag", "--limit", "2"], 2,
              "lm-eval task hellaswag: its data could not be loaded")]
    results = minidisc_forked([argv for argv, _, _ in cases], tmp_path / "logs")
    for (argv, status, wanted), result in zip(cases, results):
        err = result["stderr"]
        assert result["exit"] == status and wanted in " ".join(err.split()), (argv, err[-2000:])
        if status:
            assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("minidisc: error: "), err
    assert not (tmp_path / "out").exists()
