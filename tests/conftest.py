"""Tiny LLaMA (MHA and GQA) and OPT teachers built from configs, a SentencePiece tokenizer and text data."""
from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# token files (and anything else minidisc caches) go to a folder of this session, not the user's ~/.cache
if "MINIDISC_CACHE" not in os.environ:
    os.environ["MINIDISC_CACHE"] = tempfile.mkdtemp(prefix="minidisc-test-cache-")
    atexit.register(shutil.rmtree, os.environ["MINIDISC_CACHE"], ignore_errors=True)
if not torch.cuda.is_available():  # Triton kernels run on CPU tensors in the interpreter (set before import)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from helpers import CONFIGS, VOCAB, save_teacher  # noqa: E402

import engine  # noqa: E402  (registers the MiniDisc model classes)
from engine.cli.demo import train_tokenizer, write_corpus  # noqa: E402


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("corpus")
    train, dev = write_corpus(directory)
    records = [p for p in train.read_text().split("\n\n") if p.strip()][:400]
    jsonl = directory / "train.jsonl"
    jsonl.write_text("".join(json.dumps({"text": r, "id": i}) + "\n" for i, r in enumerate(records)))
    return {"train": train, "dev": dev, "jsonl": jsonl}


@pytest.fixture(scope="session")
def tokenizer_dir(corpus, tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(corpus["train"], directory, vocab_size=VOCAB)
    return directory


@pytest.fixture(scope="session")
def pruned_dirs(corpus, tokenizer_dir, tmp_path_factory) -> dict[str, Path]:
    """`minidisc prune` output for every tiny family (session-wide: several test files read them)."""
    out = {}
    for name in CONFIGS:
        root = tmp_path_factory.mktemp(name)
        teacher = save_teacher(name, root / "teacher", tokenizer_dir)
        engine.prune(teacher, corpus["jsonl"], root / "pruned", calib_samples=4, seq_len=32, batch_size=2,
                     attention_unit=CONFIGS[name].get("attention_unit", "kv-group"))
        out[name] = root / "pruned"
    return out


@pytest.fixture(scope="session")
def trained_teacher(corpus, tokenizer_dir, tmp_path_factory) -> Path:
    """A tiny LLaMA (GQA) pretrained briefly on the corpus, so its next-token predictions mean something."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from engine.cli.demo import pretrain
    from engine.data import load_text_dataset, token_blocks

    directory = tmp_path_factory.mktemp("trained") / "teacher"
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    blocks = token_blocks(load_text_dataset(corpus["train"]), tokenizer, 32, 2000, seed=0)
    options = {k: v for k, v in CONFIGS["llama_gqa"].items() if k != "model_type"}
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, **options))
    losses = pretrain(model, blocks, steps=150, batch_size=16, lr=1e-2)
    assert losses[-1] < losses[0] - 1.0, losses[::10]  # it learned something
    model.eval().save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


_SESSION_START = __import__("time").time()


def pytest_sessionfinish(session, exitstatus):
    """Remove the /dev/shm buffers DeepSpeed's CPU communication op left behind during this session."""
    import glob

    for path in glob.glob("/dev/shm/deepspeed_*"):
        try:
            if os.stat(path).st_mtime >= _SESSION_START - 1:
                os.unlink(path)
        except OSError:
            pass
