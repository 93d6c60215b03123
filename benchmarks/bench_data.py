"""Tokenising a large corpus into token files, and what reading them costs each rank.

1. Generates a corpus of at least --tokens tokens (jsonl shards of documents of pydoc words) and one --ratio times
   smaller, with a SentencePiece tokenizer trained on the pydoc text (vocabulary 2000, so uint16 tokens).
2. Tokenises the large corpus with 1 and with 2 processes (engine.data.token_file, each into a fresh cache):
   tokens/s and the token file's bytes per token.
3. For each corpus, 2 processes (gloo) run a run's data path: rank 0 describes the splits (the token files are
   built already), every rank maps them and reads its share of --steps global batches of --batch-size x --seq-len
   (BatchOrder). Each rank's resident memory after the imports, at the end (also split into anonymous and
   file-backed pages: the token file's pages a rank touched) and at its peak: they must not grow with the corpus.
Appends rows to benchmarks/results/data.csv.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from results_csv import append_rows

SHARD_WORDS = 5_000_000


def write_corpus(folder: Path, words: int, vocabulary: list[str], seed: int) -> None:
    """jsonl shards of documents of 20-400 random words (a fixed seed: the same corpus every time)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    lexicon = np.array(vocabulary)
    written, shard = 0, 0
    while written < words:
        count = min(SHARD_WORDS, words - written)
        picks = lexicon[rng.integers(0, len(lexicon), count)]
        cuts = np.cumsum(rng.integers(20, 400, count // 20 + 1))
        cuts = cuts[cuts < count]
        with open(folder / f"shard-{shard:04d}.jsonl", "w") as f:
            for doc in np.split(picks, cuts):
                f.write(json.dumps({"text": " ".join(doc.tolist())}) + "\n")
        written, shard = written + count, shard + 1


def worker(args) -> None:
    """One rank of the data path of a run (see the module docstring)."""
    from transformers import AutoTokenizer

    from engine.config import RunConfig
    from engine.core import distributed as dist
    from engine.data import parse_sources
    from engine.data.splits import describe, open_data
    from engine.training.batches import BatchOrder
    from engine.training.memory import status_kb
    from engine.training.stage import TrainConfig

    def mb(field: str = "VmRSS") -> float:  # VmHWM, unlike ru_maxrss, is not inherited across fork
        return round(status_kb(field) / 1024, 1)

    dist.init()
    imported = mb()
    root = Path(args.cache)
    with dist.main_first("describing the data") as main:
        if main:
            described = describe(parse_sources(args.data), {"dev": (None, 64), "test": (None, 64)}, "text",
                                 AutoTokenizer.from_pretrained(args.tokenizer), args.seq_len, root)
            Path(args.out).with_suffix(".data.json").write_text(json.dumps(described))
    train, dev, test = open_data(json.loads(Path(args.out).with_suffix(".data.json").read_text()), root, seed=0)
    cfg = TrainConfig.of(RunConfig(teacher="-", data="-", out="-", batch_size=args.batch_size))
    order, tokens = BatchOrder(train), 0
    for step in range(args.steps):
        ids, _ = order.batch(step, 0, cfg)
        tokens += ids.numel()
    result = {"rank": dist.rank(), "imported_mb": imported, "end_mb": mb(), "end_anon_mb": mb("RssAnon"),
              "end_file_mb": mb("RssFile"), "peak_mb": mb("VmHWM"), "tokens_read": tokens,
              "train_blocks": len(train)}
    Path(args.out).with_suffix(f".rank{dist.rank()}.json").write_text(json.dumps(result))


def two_ranks(args, data: Path, cache: Path, tokenizer: Path, out: Path) -> list[dict]:
    port = str(29600 + os.getpid() % 1000)
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "OMP_NUM_THREADS": "1"}
        command = [sys.executable, __file__, "--worker", "--data", str(data), "--cache", str(cache), "--tokenizer",
                   str(tokenizer), "--out", str(out), "--steps", str(args.steps), "--batch-size",
                   str(args.batch_size), "--seq-len", str(args.seq_len)]
        procs.append(subprocess.Popen(command, env=env))
    if any(p.wait() for p in procs):
        raise SystemExit("a rank failed")
    return [json.loads(out.with_suffix(f".rank{r}.json").read_text()) for r in range(2)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=float, default=1e8, help="tokens of the large corpus (at least)")
    parser.add_argument("--ratio", type=int, default=10, help="how many times smaller the small corpus is")
    parser.add_argument("--steps", type=int, default=500, help="global batches each 2-process run reads")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--work", help="folder for the corpora and caches (default: a temporary one, removed)")
    for name in ("--data", "--cache", "--tokenizer", "--out"):
        parser.add_argument(name, help=argparse.SUPPRESS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    from pydoc_data.topics import topics

    import datasets
    import torch
    import transformers
    from transformers import AutoTokenizer

    import engine
    from engine.cli.demo import train_tokenizer
    from engine.cli.demo import write_corpus as write_pydoc
    from engine.core.progress import setup_logging
    from engine.data import token_file

    datasets.disable_progress_bars()
    setup_logging("INFO")  # the engine's tokenising progress lines
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-data-"))
    work.mkdir(parents=True, exist_ok=True)
    tokenizer_dir = work / "tokenizer"
    if not tokenizer_dir.is_dir():
        train_tokenizer(write_pydoc(work)[0], tokenizer_dir, vocab_size=2000)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    vocabulary = sorted({w for text in topics.values() for w in text.split() if w.isalpha()})
    sample = " ".join(vocabulary[::7])
    per_word = len(tokenizer(sample)["input_ids"]) / len(sample.split())
    words = int(args.tokens / per_word * 1.05)
    corpora = {"large": (work / "large", words), "small": (work / "small", words // args.ratio)}
    for folder, count in corpora.values():
        if not folder.is_dir():
            started = time.perf_counter()
            write_corpus(folder, count, vocabulary, seed=0)
            print(f"generated {folder} ({count:,} words) in {time.perf_counter() - started:.0f} s", flush=True)

    base = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "cpus": os.cpu_count(),
            "vocab": len(tokenizer), "seq_len": args.seq_len, "minidisc": engine.__version__,
            "torch": torch.__version__, "transformers": transformers.__version__, "datasets": datasets.__version__,
            "python": platform.python_version()}
    rows = []
    for workers in (1, 2):
        cache = work / f"cache-{workers}"
        shutil.rmtree(cache, ignore_errors=True)
        started = time.perf_counter()
        file = token_file(str(corpora["large"][0]), "text", tokenizer, cache, workers=workers)
        seconds = time.perf_counter() - started
        n_tokens = int(file.offsets[-1])
        size = sum(p.stat().st_size for p in file.folder.iterdir())
        rows.append({**base, "measure": "tokenise", "corpus": "large", "workers": workers, "tokens": n_tokens,
                     "documents": len(file), "seconds": round(seconds, 1), "tokens_per_s": round(n_tokens / seconds),
                     "file_bytes": size, "bytes_per_token": round(size / n_tokens, 3)})
        print(rows[-1], flush=True)
    for name, (folder, _) in corpora.items():
        cache = work / "cache-2"
        token_file(str(folder), "text", tokenizer, cache)  # built here, so the ranks only read
        ranks = two_ranks(args, folder, cache, tokenizer_dir, work / f"ranks-{name}")
        for result in ranks:
            rows.append({**base, "measure": "read", "corpus": name, "workers": 2,
                         "tokens": int(token_file(str(folder), "text", tokenizer, cache).offsets[-1]),
                         "steps": args.steps, "batch_size": args.batch_size, **result})
            print(rows[-1], flush=True)
    append_rows("data.csv", rows)
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
