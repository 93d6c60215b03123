"""The built-in example that `minidisc compress` runs when it is given no teacher and no data.

Nothing is downloaded; everything comes from the Python that runs it. Dev and test are paragraphs of
`pydoc_data.topics` (English from the Python docs); the students' training text is a share of the other paragraphs;
the teacher is pretrained on that text and on a pool the students never see (the remaining paragraphs and the
standard library's docstrings and comments, ~2.5 MB): it knows more than the students' data, as a real teacher
pretrained on far more text does. No dev or test paragraph, and no 8-word sequence of one, occurs in anything a model
or the tokenizer is trained on (`held_out`). Corpus, tokenizer and teacher are cached (MINIDISC_CACHE, default
~/.cache/minidisc), so only the first run pays for them. `MINIDISC_BUILTIN=test` selects a tiny variant for the test
suite.
"""
from __future__ import annotations

import ast
import importlib.util
import io
import json
import logging
import os
import random
import sysconfig
import time
import tokenize
from dataclasses import dataclass, field
from pathlib import Path

from engine.config import DS_CONFIGS
from engine.core.errors import UserError
from engine.core.outputs import atomic_output_dir, cache_dir, is_ours
from engine.core.progress import progress
from engine.data import load_text_dataset, token_blocks
from engine.data.overlap import ngrams, normalise
from engine.report.harness import BUILTIN_TASKS

log = logging.getLogger(__name__)

DEMO_TEACHER = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                    num_key_value_heads=4, max_position_embeddings=512)
# bump when the setup changes, so stale caches are not reused (2: test.txt unseen by the teacher; 3: deduplicated
# held-out text, and a teacher pretrained on a pool the students do not see)
VERSION = 3


@dataclass(frozen=True)
class Builtin:
    """Sizes of the built-in corpus, teacher and pretraining, and the options of the built-in compress run.
    `held_out_fraction` of the pydoc paragraphs go to dev and as many to test; `distill_fraction` of the rest is
    the students' training text; `pool_limit` caps the standard library's texts in the teacher's pool (None: all);
    the teacher sees the students' text `distill_repeats` times per pass over its pool."""

    teacher: dict
    vocab_size: int
    pretrain_steps: int
    pretrain_batch: int
    seq_len: int
    held_out_fraction: float = 0.1
    distill_fraction: float = 0.5
    pool_limit: int | None = None
    distill_repeats: int = 3
    run: dict = field(default_factory=dict)


BUILTINS = {
    # ~3.9M parameters; about 6 minutes of pretraining and 8 of compression on 2 CPU cores.
    "default": Builtin(teacher=DEMO_TEACHER, vocab_size=2000, pretrain_steps=1200, pretrain_batch=16, seq_len=128,
                       run=dict(max_steps=500, eval_every=50, batch_size=8, seq_len=128, eval_samples=96,
                                test_samples=128, calib_samples=32, lr=1e-3, baselines=["kd-matched", "ce"])),
    "test": Builtin(teacher=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, max_position_embeddings=256),
                    vocab_size=512, pretrain_steps=40, pretrain_batch=8, seq_len=32, pool_limit=300,
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
        options["deepspeed"] = str(DS_CONFIGS / "zero3_train_fp32.json")
    if importlib.util.find_spec("lm_eval"):  # minidisc[eval]: the report gets a benchmark table

        options["eval_tasks"] = list(BUILTIN_TASKS)
    return options


def builtin_setup(name: str = "default") -> Path:
    """The folder with train.txt, dev.txt, test.txt, pool.txt (the teacher's own text) and teacher/ (tokenizer
    included), built once and cached."""
    directory = cache_dir() / f"builtin-{name}-v{VERSION}"
    if is_ours(directory):
        log.info("built-in example: reusing the pretrained teacher in %s", directory)
        return directory
    setup = BUILTINS[name]
    log.info("built-in example: writing the corpus, training a tokenizer and pretraining a small LLaMA teacher "
             "(cached in %s for later runs)", directory)
    with atomic_output_dir(directory, kind="builtin-example") as scratch:
        corpus = write_builtin_corpus(scratch, setup)
        tokenizer = train_tokenizer([corpus.pool, corpus.train], scratch / "teacher", vocab_size=setup.vocab_size)
        _pretrained_teacher(setup, tokenizer, corpus, scratch / "teacher")
    return directory


def _pretrained_teacher(setup: Builtin, tokenizer, corpus: Corpus, out: Path) -> None:
    """Pretrain on the pool and the students' text (each repeat packed in another order); dev and test stay
    unseen."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    distill = load_text_dataset(corpus.train)
    blocks = torch.cat([token_blocks(load_text_dataset(corpus.pool), tokenizer, setup.seq_len, None, seed=0)] +
                       [token_blocks(distill, tokenizer, setup.seq_len, None, seed=1 + k)
                        for k in range(setup.distill_repeats)])
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), bos_token_id=1, eos_token_id=2,
                                         **setup.teacher))
    parameters = sum(p.numel() for p in model.parameters())
    log.info("pretraining the teacher (LLaMA, %s parameters) for %d steps of %d x %d tokens on %d blocks",
             f"{parameters:,}", setup.pretrain_steps, setup.pretrain_batch, setup.seq_len, len(blocks))
    started = time.perf_counter()
    losses = pretrain(model, blocks, steps=setup.pretrain_steps, batch_size=setup.pretrain_batch)
    model.eval().save_pretrained(out)
    (out / "pretraining.json").write_text(json.dumps({
        "steps": setup.pretrain_steps, "batch": setup.pretrain_batch, "seq_len": setup.seq_len,
        "blocks": len(blocks), "distill_repeats": setup.distill_repeats, "parameters": parameters,
        "first_loss": losses[0], "last_loss": losses[-1], "seconds": round(time.perf_counter() - started, 1)},
        indent=1) + "\n")
    log.info("teacher pretrained: loss %.2f -> %.2f in %.0f s", losses[0], losses[-1], time.perf_counter() - started)


def pydoc_paragraphs() -> list[str]:
    """The pydoc topics' paragraphs, each distinct (normalised) text once, in file order."""
    from pydoc_data.topics import topics

    return _distinct(p.strip() for text in topics.values() for p in text.split("\n\n"))


def stdlib_texts(limit: int | None = None) -> list[str]:
    """The standard library's docstrings and comment blocks of 8 words or more, each distinct text once, in a fixed
    order (at most `limit`). Test folders and idlelib are skipped: some distributions ship them separately."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"idlelib", "site-packages", "dist-packages", "__pycache__", "turtledemo", "lib2to3"}
    texts: list[str] = []
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).parts
        if any(p in skip or p.startswith("test") for p in parts):
            continue
        try:
            source = path.read_text(encoding="utf-8")
            texts += _docstrings(source) + _comments(source)
        except (OSError, UnicodeDecodeError, SyntaxError, ValueError, tokenize.TokenError):
            continue  # an unreadable file of an odd distribution: its text is simply not in the pool
        if limit and len(texts) >= 2 * limit:
            break
    return _distinct(texts)[:limit]


def _docstrings(source: str) -> list[str]:
    nodes = (n for n in ast.walk(ast.parse(source)) if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef,
                                                                        ast.AsyncFunctionDef)))
    return [d for d in (ast.get_docstring(n) for n in nodes) if d]


def _comments(source: str) -> list[str]:
    """Runs of comment lines, each run one text (comments of fewer than 8 words are mostly code notes)."""
    blocks, run = [], []
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            run.append(token.string.lstrip("#").strip())
        elif token.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT) and run:
            blocks.append(" ".join(w for w in run if w))
            run = []
    return [b for b in blocks if len(b.split()) >= 8]


def _distinct(texts) -> list[str]:
    seen, kept = set(), []
    for text in texts:
        key = normalise(text)
        if key and key not in seen:
            seen.add(key)
            kept.append(text)
    return kept


def held_out(candidates: list[str], n: int, training: set[int]) -> list[str]:
    """The first `n` candidates that share no 8-word sequence with `training` (n-gram hashes) and have 8 words or
    more (a shorter one could sit inside a training text unseen); their n-grams join `training`, so a later split
    shares none with this one either."""
    kept = []
    for text in candidates:
        if len(kept) == n:
            break
        grams = ngrams(text)
        if grams and grams.isdisjoint(training):
            kept.append(text)
            training |= grams
    return kept


@dataclass(frozen=True)
class Corpus:
    """The built-in example's text files: students train on `train`, the teacher on `pool` and `train`; dev selects
    and test reports, and neither shares an 8-word sequence with anything a model or the tokenizer trained on."""

    train: Path
    dev: Path
    test: Path
    pool: Path


def write_builtin_corpus(directory: Path, setup: Builtin) -> Corpus:
    """Dev and test from the pydoc topics; the remaining topics split between the students' distillation set and
    the teacher's pool, which also holds the standard library's docstrings and comments. The teacher knows more
    than the students' data: the task-distillation regime where its soft labels carry knowledge."""
    paragraphs = pydoc_paragraphs()
    random.Random(0).shuffle(paragraphs)  # topics come in clusters; a shuffle spreads each over the splits
    n_held = round(len(paragraphs) * setup.held_out_fraction)
    candidates, rest = paragraphs[:3 * n_held], paragraphs[3 * n_held:]  # spares for the held-out texts dropped
    distill = rest[: round(len(rest) * setup.distill_fraction)]
    pool = rest[len(distill):] + stdlib_texts(setup.pool_limit)
    training = set().union(*(ngrams(text) for text in distill + pool))
    dev = held_out(candidates, n_held, training)
    test = held_out(candidates[candidates.index(dev[-1]) + 1:], n_held, training)
    files = {name: directory / f"{name}.txt" for name in ("train", "dev", "test", "pool")}
    for name, texts in zip(files, (distill, dev, test, pool)):
        files[name].write_text("\n\n".join(texts) + "\n")
    return Corpus(**files)


def write_corpus(directory: Path, dev_fraction: float = 0.05, test_fraction: float = 0.0) -> tuple[Path, ...]:
    """train.txt, dev.txt (and test.txt when `test_fraction`): the pydoc topics, one distinct paragraph per record,
    blank-line separated, dev and test taken from the start and sharing no 8-word sequence with train (the test
    suite's corpus). Returns their paths in that order."""
    paragraphs = pydoc_paragraphs()
    n_dev = max(1, int(len(paragraphs) * dev_fraction))
    n_test = int(len(paragraphs) * test_fraction)
    candidates, train = paragraphs[:2 * (n_dev + n_test)], paragraphs[2 * (n_dev + n_test):]
    training = set().union(*(ngrams(text) for text in train))
    parts = {"train": train, "dev": held_out(candidates, n_dev, training)}
    parts["test"] = held_out([c for c in candidates if c not in parts["dev"]], n_test, training) if n_test else []
    paths = []
    for name in ("train", "dev", "test"):
        if parts[name]:
            paths.append(directory / f"{name}.txt")
            paths[-1].write_text("\n\n".join(parts[name]) + "\n")
    return tuple(paths)


def train_tokenizer(corpus: Path | list[Path], directory: Path, vocab_size: int = 2000):
    """A SentencePiece BPE model of the text file(s) `corpus`, wrapped as a LLaMA tokenizer and saved into
    `directory`."""
    import sentencepiece as spm
    from transformers import LlamaTokenizer

    directory.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        input=[str(p) for p in (corpus if isinstance(corpus, list) else [corpus])],
        model_prefix=str(directory / "tokenizer"), vocab_size=vocab_size, model_type="bpe",
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
