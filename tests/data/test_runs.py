"""A run on a weighted mixture of a plain-text source and a chat source: through the recipe and the Python API,
killed and resumed, with the test tokens the chat masks leave; and a resume refused when the data changed."""
from __future__ import annotations

import json
import os
import shutil
import subprocess

import numpy as np
import pytest
import yaml
from helpers import FP32, MINIDISC, assert_same_weights, minidisc, run_python, tracked_csv
from transformers import AutoTokenizer

from engine.core import faults

pytestmark = pytest.mark.slow
TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


@pytest.fixture(scope="module")
def mixture(pruned_dirs, corpus, tmp_path_factory):
    """A pruned teacher whose tokenizer has a chat template, and the run's options: 3 parts text, 1 part chat."""
    root = tmp_path_factory.mktemp("mixture")
    teacher = root / "teacher"
    shutil.copytree(pruned_dirs["llama_gqa"], teacher)
    tokenizer = AutoTokenizer.from_pretrained(teacher)
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(teacher)
    paragraphs = [p for p in corpus["train"].read_text().split("\n\n") if p.strip()][:300]
    chat = root / "chat.jsonl"
    chat.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": "Explain: " + p.split(".")[0][:80]},
        {"role": "assistant", "content": p[:300]}]}) + "\n" for p in paragraphs))
    options = {"teacher": str(teacher), "data": [{"path": str(corpus["jsonl"]), "weight": 3},
                                                 {"path": str(chat), "weight": 1}],
               "max_steps": 6, "eval_every": 3, "batch_size": 4, "seq_len": 48, "eval_samples": 8,
               "test_samples": 8, "lr": 2e-3, "deepspeed": FP32}
    return root, options


def run_api(options: dict, out, **extra):
    code = ("import sys, json, engine\n"
            "engine.distill(engine.RunConfig(**json.loads(sys.argv[1])).validate())\n")
    return run_python(code, json.dumps({**options, "out": str(out), **extra}), env={"OMP_NUM_THREADS": "1"})


def test_a_mixture_with_chat_data_resumes_to_the_same_student(mixture, tmp_path):
    root, options = mixture
    reference = run_api(options, tmp_path / "api", report_to=["csv"])
    assert reference.returncode == 0, reference.stderr[-4000:]
    report = json.loads((tmp_path / "api" / "report.json").read_text())
    text, chat = report["data"]["sources"]
    assert (text["chat"], chat["chat"], text["weight"], chat["weight"]) == (False, True, 3, 1)
    assert chat["field"] == "messages" and chat["truncated"] > 0 and 0 < chat["padding"] < 1
    markdown = (tmp_path / "api" / "report.md").read_text()
    assert "## Data" in markdown and f"| chat | {chat['documents']} |" in markdown
    # the test tokens counted: every next token of a text block, the assistant's of a chat block
    described = json.loads((tmp_path / "api" / "work" / "data.json").read_text())
    assert report["student"]["test_tokens"] == counted_tokens(described, "test")
    # the Python API's trackers: the CSV holds the report's training curve
    curve = {p["step"]: p["loss"] for p in report["curves"]["student"]["train"]}
    assert tracked_csv(tmp_path / "api", "student")["train/loss/s=0.9"] == pytest.approx(curve, abs=1e-6)

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({**options, "out": str(tmp_path / "cli")}))
    killed = minidisc("distill", "--config", recipe, check=False, env={faults.KILL_AT: "student:step@4"})
    assert killed.returncode == -9
    log = tmp_path / "resumed.log"  # stderr a file, as in a batch job: plain progress lines
    with open(log, "w") as stderr:
        resumed = subprocess.run([MINIDISC, "distill", "--config", recipe, "--resume", "--log-every", "1"],
                                 stderr=stderr, stdout=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert resumed.returncode == 0, log.read_text()[-4000:]
    steps = [line.split(" | ")[0].split()[-2] for line in log.read_text().splitlines() if " | loss s=" in line]
    assert steps == ["4/6", "5/6", "6/6"], log.read_text()[-3000:]  # killed in step 4, resumed from step 3
    assert_same_weights(tmp_path / "api" / "student", tmp_path / "cli" / "student")

    with open(options["data"][1]["path"], "a") as f:  # the data changes under a run
        f.write(json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]})
                + "\n")
    refused = minidisc("distill", "--config", recipe, "--resume", check=False)
    assert refused.returncode == 2 and "changed since the run started" in refused.stderr.strip().splitlines()[-1]


def counted_tokens(described: dict, split: str) -> int:
    """Next tokens the loss counts in a split, from the token files: seq_len - 1 per text block; per chat block,
    the assistant tokens among its first seq_len, but the first position's."""
    from pathlib import Path

    root, size, total = Path(os.environ["MINIDISC_CACHE"]) / "tokens", described["seq_len"], 0
    for part in described[split]:
        folder = root / part["key"]
        if not json.loads((folder / "meta.json").read_text())["chat"]:
            total += part["blocks"] * (size - 1)
            continue
        offsets = np.fromfile(folder / "offsets.bin", dtype=np.int64)
        mask = np.fromfile(folder / "mask.bin", dtype=np.uint8)
        for d in range(part["first"], part["first"] + part["blocks"]):
            total += int(mask[offsets[d] + 1: min(offsets[d + 1], offsets[d] + size)].sum())
    return total


def test_a_plain_text_corpus_on_one_line_trains(pruned_dirs, corpus, tmp_path):
    """A plain-text corpus without blank lines is one record: it is cut into documents of at most DOCUMENT_TOKENS
    tokens, dev and test take the first of them, and the report's Data table says so."""
    from engine.data.tokens import DOCUMENT_TOKENS

    one = tmp_path / "one.txt"
    one.write_text(" ".join(corpus["train"].read_text().split()) + "\n")
    out = tmp_path / "out"
    minidisc("distill", "--teacher", pruned_dirs["llama_gqa"], "--data", one, "--out", out, "--max-steps", "2",
             "--eval-every", "2", "--batch-size", "4", "--seq-len", "32", "--eval-samples", "8", "--test-samples", "8",
             "--sample-tokens", "0", "--deepspeed", FP32)
    report = json.loads((out / "report.json").read_text())
    source = report["data"]["sources"][0]
    assert source["records"] == 1 and source["records_split"] == 1
    assert source["documents"] == -(-source["tokens"] // DOCUMENT_TOKENS) > 10
    described = json.loads((out / "work" / "data.json").read_text())
    assert [(p["first"], p["end"]) for p in described["dev"] + described["test"]] == [(0, 1), (1, 2)]
    assert described["train"][0]["first"] == 2  # training starts after the held-out token ranges
    assert f"| text | 1 | 1 | {source['documents']} |" in (out / "report.md").read_text()
    assert 0 < source["tokenise_s"] < 600  # how long its token file took to build


@pytest.mark.multiprocess
def test_only_rank_0_reads_the_data_sources(pruned_dirs, corpus, tmp_path):
    """Reading a JSON source converts it to Arrow; with N ranks (on N nodes) that ran N times. Rank 0 checks and
    tokenises, the other ranks read token files only."""
    from helpers import launch_two_ranks

    options = {"teacher": str(pruned_dirs["llama_gqa"]), "data": [str(corpus["jsonl"])], "dev_data": str(corpus["dev"]),
               "out": str(tmp_path / "out"), "seq_len": 32, "batch_size": 4, "eval_samples": 8, "test_samples": 8,
               "deepspeed": FP32, "token_cache": str(tmp_path / "tokens")}
    reads = launch_two_ranks("data_checks_worker.py", tmp_path / "reads.json", "--options", json.dumps(options))
    assert sorted(reads["0"]) == sorted([str(corpus["jsonl"]), str(corpus["dev"])]) and reads["1"] == []
