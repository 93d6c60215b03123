"""Hub ids: models and data sets named `org/name` resolve from a Hugging Face cache folder built here (the layout
`huggingface_hub` writes: refs/main -> snapshots/REV), offline, through the console script; what is not in the
cache is one line naming the `hf download` command, before anything is written."""
from __future__ import annotations

import json
import os
import subprocess

import pytest
from helpers import MINIDISC, minidisc_forked, save_teacher
from huggingface_hub import ModelCard

from engine.core.hub import hub_id_of, is_hub_id, public_name

REVISION = "0123456789abcdef0123456789abcdef01234567"


def cached_repo(hub, kind: str, repo_id: str):
    """An empty snapshot of `repo_id` in the cache folder `hub`, as `hf download` leaves it; returns the folder."""
    repo = hub / f"{kind}s--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(REVISION)
    (repo / "snapshots" / REVISION).mkdir(parents=True)
    return repo / "snapshots" / REVISION


@pytest.fixture(scope="module")
def hub(tmp_path_factory, tokenizer_dir, corpus):
    """A Hub cache with a tiny LLaMA (`org/tiny-llama`) and a data set (`org/corpus`: a README with two configs,
    jsonl files for train and validation)."""
    hub = tmp_path_factory.mktemp("hf") / "hub"
    model = cached_repo(hub, "model", "org/tiny-llama")
    save_teacher("llama_gqa", model, tokenizer_dir)
    (model / "README.md").write_text("---\nlicense: other\nlicense_name: tiny-license\nlicense_link: LICENSE\n---\n")
    data = cached_repo(hub, "dataset", "org/corpus")
    paragraphs = [p for p in corpus["train"].read_text().split("\n\n") if p.strip()]
    for config, rows in (("main", paragraphs[:300]), ("small", paragraphs[300:360])):
        for split, part in (("train", rows[:-40]), ("validation", rows[-40:])):
            (data / config).mkdir(exist_ok=True)
            (data / config / f"{split}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in part))
    (data / "README.md").write_text("---\nconfigs:\n" + "".join(
        f"- config_name: {c}\n  data_files:\n  - split: train\n    path: {c}/train.jsonl\n"
        f"  - split: validation\n    path: {c}/validation.jsonl\n" for c in ("main", "small")) + "---\n")
    return hub


def hub_env(hub) -> dict[str, str]:
    return {"HF_HUB_CACHE": str(hub), "HF_HOME": str(hub.parent / "home"), "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1"}


def minidisc(hub, *args, cwd):
    return subprocess.run([MINIDISC, *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=600,
                          env={**os.environ, **hub_env(hub), "COLUMNS": "200"})


def test_hub_ids_and_public_names(tmp_path):
    assert is_hub_id("meta-llama/Llama-2-7b-hf") and is_hub_id("org/data:config:split") and is_hub_id("a/b@v1.0")
    assert not is_hub_id("data/train.jsonl") and not is_hub_id("/abs/path") and not is_hub_id("web/*.jsonl")
    (tmp_path / "org" / "x").mkdir(parents=True)
    assert not is_hub_id(tmp_path / "org" / "x")
    snapshot = tmp_path / "hub" / "models--meta-llama--Llama-2-7b-hf" / "snapshots" / REVISION
    assert hub_id_of(snapshot) == "meta-llama/Llama-2-7b-hf" and hub_id_of(snapshot / "config.json")
    assert hub_id_of(tmp_path / "teacher") is None
    assert public_name(snapshot) == "meta-llama/Llama-2-7b-hf" and public_name(tmp_path / "my-run") == "my-run"
    assert public_name("HuggingFaceFW/fineweb-edu:sample-10BT:train") == "HuggingFaceFW/fineweb-edu:sample-10BT:train"
    assert hub_id_of("HuggingFaceFW/fineweb-edu:sample-10BT:train") == "HuggingFaceFW/fineweb-edu"


@pytest.mark.slow
def test_teacher_and_data_by_hub_id_offline(hub, tmp_path, monkeypatch):
    """prune reads the cached weights and data; compress's dry run, plan and the errors use the same ids."""
    pruned = minidisc(hub, "prune", "--teacher", "org/tiny-llama", "--data", "org/corpus:small", "--out",
                      tmp_path / "pruned", "--calib-samples", 4, "--calib-seq-len", 32, cwd=tmp_path)
    assert pruned.returncode == 0, pruned.stderr[-3000:]
    calibration = json.loads((tmp_path / "pruned" / "pruning.json").read_text())["calibration"]
    assert calibration["data"][0]["path"] == "org/corpus:small"
    # an export's card names the original by Hub id and inherits its license; no path of this machine in it
    exported = minidisc(hub, "export", "--model", tmp_path / "pruned", "--sparsity", 0.5, "--out", tmp_path / "exp",
                        cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr[-3000:]
    card = ModelCard.load(tmp_path / "exp" / "README.md")
    assert card.data.base_model == "org/tiny-llama" and card.data.license == "other"
    assert card.data.license_name == "tiny-license" and "| license | tiny-license |" in card.text
    for folder in ("pruned", "exp"):
        for path in (tmp_path / folder).iterdir():
            text = path.read_bytes()
            assert str(tmp_path).encode() not in text and str(hub).encode() not in text, path

    dry = minidisc(hub, "compress", "--teacher", "org/tiny-llama", "--data", "org/corpus:main", "--dev-data",
                   "org/corpus:main:validation", "--seq-len", 32, "--out", tmp_path / "run", "--dry-run", cwd=tmp_path)
    assert dry.returncode == 0 and "checks passed" in dry.stdout, dry.stderr[-3000:]
    plan = minidisc(hub, "plan", "org/tiny-llama", "--gpu-memory", 8, "--json", cwd=tmp_path)
    assert plan.returncode == 0 and json.loads(plan.stdout)["family"] == "llama", plan.stderr[-2000:]

    cases = [(["compress", "--teacher", "org/absent", "--data", "org/corpus"], "model org/absent is not in the "
              "Hugging Face cache", "`hf download org/absent`"),
             (["compress", "--teacher", "org/tiny-llama@v2", "--data", "org/corpus"], "", "`hf download "
              "org/tiny-llama --revision v2`"),
             (["compress", "--teacher", "org/tiny-llama", "--data", "org/other"], "dataset org/other is not in the "
              "Hugging Face cache", "`hf download org/other --repo-type dataset`"),
             (["compress", "--teacher", "org/tiny-llama", "--data", "org/corpus:main:test"], "dataset "
              "org/corpus:main:test has no split 'test' (it has train, validation)", ""),
             (["compress", "--teacher", "org/tiny-llama", "--data", "org/corpus:large"], "dataset org/corpus:large "
              "has no config 'large' (main, small): write org/corpus:CONFIG", ""),
             (["compress", "--teacher", "org/tiny-llama", "--data", "org/corpus"], "dataset org/corpus has several "
              "configs (main, small)", "")]
    for name, value in hub_env(hub).items():
        monkeypatch.setenv(name, value)
    results = minidisc_forked([argv + ["--out", tmp_path / "refused"] for argv, _, _ in cases], tmp_path / "logs")
    for (argv, wanted, hint), result in zip(cases, results):
        err = result["stderr"].strip().splitlines()
        assert result["exit"] == 2 and wanted in err[-1] and hint in err[-1], (argv, result["stderr"][-2000:])
        assert "Traceback" not in result["stderr"]
    assert not (tmp_path / "refused").exists()
