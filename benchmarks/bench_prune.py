"""Time `minidisc prune` on a LLaMA-shaped model built from a config (no download), on this machine.

Default: ~106M parameters (LLaMA-2 vocabulary 32000, hidden 768, 8 layers, 12 heads, FFN 2048),
calibration 64 x 512 tokens of the pydoc corpus. Prints the phases and appends a row to
benchmarks/results/prune.csv tagged with device, dtype and versions.

    python benchmarks/bench_prune.py [--layers 8] [--hidden 768] [--calib-samples 64] [--seq-len 512]
"""
from __future__ import annotations

import argparse
import platform
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import transformers
from results_csv import append_rows

import engine
from engine.cli.demo import train_tokenizer, write_corpus

RESULTS = Path(__file__).with_name("results") / "prune.csv"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--kv-heads", type=int, default=12)
    parser.add_argument("--intermediate", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--calib-samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        train, _ = write_corpus(tmp)
        teacher = tmp / "teacher"
        train_tokenizer(train, teacher)
        config = transformers.LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                                          num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                                          intermediate_size=args.intermediate, max_position_embeddings=args.seq_len)
        model = transformers.LlamaForCausalLM(config)
        parameters = sum(p.numel() for p in model.parameters())
        model.save_pretrained(teacher)
        del model
        started = time.perf_counter()
        plan = engine.prune(teacher, train, tmp / "pruned", calib_samples=args.calib_samples, seq_len=args.seq_len,
                            batch_size=args.batch_size, device=args.device)
        total = time.perf_counter() - started

    timing = plan.extra["timing"]
    tokens = plan.extra["calibration"]["samples"] * args.seq_len
    row = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else f"cpu x{torch.get_num_threads()}",
        "dtype": "float32", "parameters": parameters, "layers": args.layers, "hidden": args.hidden,
        "calib_tokens": tokens, "load_s": timing["load"], "importance_s": timing["importance"],
        "save_s": timing["save"], "total_s": round(total, 2),
        "tokens_per_s": round(tokens / timing["importance"], 1),
        "minidisc": engine.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
        "python": platform.python_version(),
    }
    for key, value in row.items():
        print(f"{key:>14}: {value}")
    append_rows(RESULTS.name, [row])


if __name__ == "__main__":
    main()
