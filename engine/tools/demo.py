"""The built-in example that `minidisc compress` runs when it is given no teacher and no data.

Nothing is downloaded. The corpus is `pydoc_data.topics` (~465 KB of English from the Python docs, in every
Python), split into train/dev/test text files; a SentencePiece tokenizer is trained on the train text and a small
LLaMA teacher is pretrained on it for a few minutes (dev and test stay unseen). All three are cached
(MINIDISC_CACHE, default ~/.cache/minidisc), so only the first run pays for them. `MINIDISC_BUILTIN=test` selects
a tiny variant for the test suite.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from engine.config import REPO_CONFIGS
from engine.data import load_text_dataset, token_blocks
from engine.errors import UserError
from engine.outputs import atomic_output_dir, cache_dir, is_ours
from engine.progress import progress
from engine.tools.harness import BUILTIN_TASKS

log = logging.getLogger(__name__)

DEMO_TEACHER = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                    num_key_value_heads=4, max_position_embeddings=512)
VERSION = 2  # bump when the setup changes, so stale caches are not reused (2: test.txt, unseen by the teacher)


@dataclass(frozen=True)
class Builtin:
    """Sizes of the built-in teacher, its pretraining, and the options of the built-in compress run."""

    teacher: dict
    vocab_size: int
    pretrain_steps: int
    pretrain_batch: int
    seq_len: int
    run: dict = field(default_factory=dict)


BUILTINS = {
    # ~3.9M parameters; about 3 minutes of pretraining and 13 of compression on 2 CPU cores.
    "default": Builtin(teacher=DEMO_TEACHER, vocab_size=2000, pretrain_steps=400, pretrain_batch=16, seq_len=128,
                       run=dict(max_steps=600, eval_every=50, batch_size=8, seq_len=128, eval_samples=96,
                                calib_samples=32, lr=1e-3, baselines=["kd-matched", "kd", "ce"])),
    "test": Builtin(teacher=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, max_position_embeddings=256),
                    vocab_size=512, pretrain_steps=40, pretrain_batch=8, seq_len=32,
                    run=dict(max_steps=6, eval_every=3, batch_size=4, seq_len=32, eval_samples=16, calib_samples=4,
                             lr=2e-3, grid=[0, 0.5, 0.7, 0.9],
                             baselines=["kd-matched", "kd", "ce"])),
}
DEFAULT_OUT = "minidisc-demo"


def builtin_options() -> dict:
    """RunConfig values of the built-in run: its cached teacher and data (built on first use) and its sizes."""
    import torch

    name = os.environ.get("MINIDISC_BUILTIN", "default")
    if name not in BUILTINS:
        raise UserError(f"MINIDISC_BUILTIN={name} is not one of {', '.join(BUILTINS)}")
    setup = builtin_setup(name)
    options = dict(teacher=str(setup / "teacher"), data=str(setup / "train.txt"), dev_data=str(setup / "dev.txt"),
                   test_data=str(setup / "test.txt"), out=DEFAULT_OUT, **BUILTINS[name].run)
    if not torch.cuda.is_available():  # bf16 on a CPU is slower than fp32, and fp32 is exact
        options["deepspeed"] = str(REPO_CONFIGS / "zero3_train_fp32.json")
    if importlib.util.find_spec("lm_eval"):  # minidisc[eval]: the report gets a benchmark table

        options["eval_tasks"] = list(BUILTIN_TASKS)
    return options


def builtin_setup(name: str = "default") -> Path:
    """The folder with train.txt, dev.txt and teacher/ (tokenizer included), built once and cached."""
    directory = cache_dir() / f"builtin-{name}-v{VERSION}"
    if is_ours(directory):
        log.info("built-in example: reusing the pretrained teacher in %s", directory)
        return directory
    setup = BUILTINS[name]
    log.info("built-in example: writing the corpus, training a tokenizer and pretraining a small LLaMA teacher "
             "(cached in %s for later runs)", directory)
    with atomic_output_dir(directory, kind="builtin-example") as scratch:
        train, *_ = write_corpus(scratch, dev_fraction=0.1, test_fraction=0.1)  # the teacher never sees dev, test
        tokenizer = train_tokenizer(train, scratch / "teacher", vocab_size=setup.vocab_size)
        _pretrained_teacher(setup, tokenizer, train, scratch / "teacher")
    return directory


def _pretrained_teacher(setup: Builtin, tokenizer, train: Path, out: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    blocks = token_blocks(load_text_dataset(train), tokenizer, setup.seq_len, None, seed=0)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), bos_token_id=1, eos_token_id=2,
                                         **setup.teacher))
    parameters = sum(p.numel() for p in model.parameters())
    log.info("pretraining the teacher (LLaMA, %s parameters) for %d steps of %d x %d tokens", f"{parameters:,}",
             setup.pretrain_steps, setup.pretrain_batch, setup.seq_len)
    started = time.perf_counter()
    losses = pretrain(model, blocks, steps=setup.pretrain_steps, batch_size=setup.pretrain_batch)
    model.eval().save_pretrained(out)
    (out / "pretraining.json").write_text(json.dumps({
        "steps": setup.pretrain_steps, "batch": setup.pretrain_batch, "seq_len": setup.seq_len,
        "parameters": parameters, "first_loss": losses[0], "last_loss": losses[-1],
        "seconds": round(time.perf_counter() - started, 1)}, indent=1) + "\n")
    log.info("teacher pretrained: loss %.2f -> %.2f in %.0f s", losses[0], losses[-1], time.perf_counter() - started)


def write_corpus(directory: Path, dev_fraction: float = 0.05, test_fraction: float = 0.0) -> tuple[Path, ...]:
    """train.txt, dev.txt (and test.txt when `test_fraction`): the pydoc topics, one paragraph per record,
    blank-line separated. Returns their paths in that order."""
    from pydoc_data.topics import topics

    paragraphs = [p.strip() for text in topics.values() for p in text.split("\n\n") if p.strip()]
    n_dev = max(1, int(len(paragraphs) * dev_fraction))
    n_test = int(len(paragraphs) * test_fraction)
    parts = {"dev": paragraphs[:n_dev], "test": paragraphs[n_dev:n_dev + n_test],
             "train": paragraphs[n_dev + n_test:]}
    paths = []
    for name in ("train", "dev", "test"):
        if parts[name]:
            paths.append(directory / f"{name}.txt")
            paths[-1].write_text("\n\n".join(parts[name]) + "\n")
    return tuple(paths)


def train_tokenizer(corpus: Path, directory: Path, vocab_size: int = 2000):
    """A SentencePiece BPE model wrapped as a LLaMA tokenizer and saved into `directory`."""
    import sentencepiece as spm
    from transformers import LlamaTokenizer

    directory.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(directory / "tokenizer"), vocab_size=vocab_size, model_type="bpe",
        character_coverage=0.9995, byte_fallback=True, bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
        num_threads=2, minloglevel=2,
    )
    tokenizer = LlamaTokenizer.from_pretrained(directory, add_bos_token=True)
    (directory / "tokenizer.vocab").unlink(missing_ok=True)
    tokenizer.save_pretrained(directory)
    return tokenizer


def pretrain(model, blocks, steps: int, batch_size: int = 16, lr: float = 3e-3, seed: int = 0) -> list[float]:
    """Train a causal LM on token blocks [n, T] for `steps` AdamW steps (cosine decay); returns the losses.
    Enough to make a small teacher's predictions mean something, so the TA choice is not noise."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.95))
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps, eta_min=lr / 10)
    model.train()
    losses = []
    for _ in progress(range(steps), "pretraining the teacher"):
        batch = blocks[torch.randint(len(blocks), (batch_size,), generator=generator)]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses
