"""Which attention unit and which normalisation of attention importance rank better, on GQA teachers with 2, 3
and 4 KV groups (issue 16). Dev selects; test is reported beside it.

Teachers, pretrained on the built-in corpus with the built-in tokenizer (engine.cli.demo, cached in --work):
    gqa4  the built-in teacher itself (LLaMA, hidden 256, 4 layers, 8 query heads in 4 KV groups)
    gqa2  the same shapes with 2 KV groups (4 query heads each)
    gqa3  hidden 240, 6 query heads of 40 dimensions in 3 KV groups
For every teacher x `--attention-unit` (kv-group, query-head) x `--attention-norm` (layer, none):
    one-shot  `minidisc prune` (64 calibration blocks of 128 tokens), then the supernet at sparsity 0.3, 0.5 and 0.9
              with no training: perplexity and next-token accuracy on the dev blocks;
    KD        plain KD (`minidisc distill`) of the 0.5 and the 0.9 width from the teacher, --max-steps steps: dev and
              test accuracy of the best dev snapshot.
Appends one row per (teacher, unit, norm, sparsity) to benchmarks/results/attention_units.csv and prints the table.
A finished piece (pruned teacher, KD report) is read back, so a killed run continues where it was.

    python benchmarks/bench_attention_units.py [--max-steps 150] [--work /tmp/attention-units]
    python benchmarks/bench_attention_units.py --units kv-group --norms none   # one slice of the table
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from datetime import datetime, timezone  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a source tree too
from results_csv import append_rows  # noqa: E402

from engine.pruning.prune import NORMS as ENGINE_NORMS  # noqa: E402

TEACHERS = {  # name -> LlamaConfig shapes (vocabulary, positions and the rest from the built-in teacher)
    "gqa2": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=2),
    "gqa3": dict(hidden_size=240, intermediate_size=640, num_hidden_layers=4, num_attention_heads=6,
                 num_key_value_heads=3),
    "gqa4": None,  # the built-in teacher
}
UNITS, NORMS, ONE_SHOT, KD_SPARSITIES = ("kv-group", "query-head"), ("layer", "none"), (300, 500, 900), (500, 900)
GRID = (0, 300, 500, 700, 900)


def teacher_dir(name: str, work: Path, builtin: Path) -> Path:
    """The built-in teacher, or one pretrained like it with other attention shapes (cached under `work`)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from engine.cli.demo import BUILTINS, pretrain
    from engine.core.outputs import atomic_output_dir, is_ours
    from engine.data import load_text_dataset, token_blocks

    if TEACHERS[name] is None:
        return builtin / "teacher"
    out = work / "teachers" / name
    if is_ours(out):
        return out
    setup = BUILTINS["default"]
    tokenizer = AutoTokenizer.from_pretrained(builtin / "teacher")
    blocks = token_blocks(load_text_dataset(builtin / "train.txt"), tokenizer, setup.seq_len, None, seed=0)
    torch.manual_seed(0)
    shapes = {**setup.teacher, **TEACHERS[name]}
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), bos_token_id=1, eos_token_id=2, **shapes))
    losses = pretrain(model, blocks, steps=setup.pretrain_steps, batch_size=setup.pretrain_batch)
    print(f"{name}: pretrained, loss {losses[0]:.2f} -> {losses[-1]:.2f}", flush=True)
    with atomic_output_dir(out, kind="benchmark-teacher") as scratch:
        model.eval().save_pretrained(scratch)
        tokenizer.save_pretrained(scratch)
    return out


def dev_blocks(builtin: Path, teacher: Path, seq_len: int, count: int):
    from transformers import AutoTokenizer

    from engine.data import load_text_dataset, token_blocks

    tokenizer = AutoTokenizer.from_pretrained(teacher)
    return token_blocks(load_text_dataset(builtin / "dev.txt"), tokenizer, seq_len, count, seed=0)


def one_shot(pruned: Path, blocks) -> dict[int, dict]:
    """Dev perplexity and next-token accuracy of the pruned teacher's supernet at each ONE_SHOT sparsity."""
    import torch

    import engine

    supernet = engine.Supernet.from_pretrained(pruned).eval()
    results = {}
    for permille in ONE_SHOT:
        supernet.set_sparsity(permille)
        loss = correct = count = 0.0
        with torch.no_grad():
            for batch in blocks.split(16):
                logits = supernet(input_ids=batch).logits[:, :-1].float()
                targets = batch[:, 1:]
                loss += torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum")
                correct += (logits.argmax(-1) == targets).sum().item()
                count += targets.numel()
        results[permille] = {"one_shot_ppl": math.exp(loss.item() / count), "one_shot_acc": correct / count}
    return results


def short_kd(pruned: Path, builtin: Path, out: Path, max_steps: int, permille: int) -> dict:
    """Plain KD of the width at `permille`: the best dev snapshot's dev and test accuracy."""
    import engine
    from engine.cli.demo import builtin_options
    from engine.config import RunConfig

    report_path = out / "report.json"
    if not report_path.is_file():
        options = {**builtin_options(), "teacher": str(pruned), "out": str(out), "target_sparsity": permille / 1000,
                   "max_steps": max_steps, "eval_every": max(1, max_steps // 3), "eval_tasks": [], "sample_tokens": 0,
                   "baselines": [],
                   "data": str(builtin / "train.txt"), "dev_data": str(builtin / "dev.txt"),
                   "test_data": str(builtin / "test.txt")}
        engine.distill(RunConfig(**options).validate())
    student = json.loads(report_path.read_text())["student"]
    return {"kd_dev_acc": student["dev_accuracy"], "kd_test_acc": student["accuracy"], "kd_steps": max_steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/attention-units"))
    parser.add_argument("--max-steps", type=int, default=150, help="KD steps (default 150)")
    parser.add_argument("--dev-blocks", type=int, default=96)
    parser.add_argument("--teachers", nargs="+", default=list(TEACHERS), choices=list(TEACHERS))
    parser.add_argument("--units", nargs="+", default=list(UNITS), choices=UNITS)
    parser.add_argument("--norms", nargs="+", default=list(NORMS), choices=list(ENGINE_NORMS),
                        help="--attention-norm values to compare: a new entry in engine.pruning.prune.NORMS is one")
    parser.add_argument("--no-csv", action="store_true")
    args = parser.parse_args()

    import torch
    import transformers

    import engine
    from engine.cli.demo import BUILTINS, builtin_setup

    builtin = builtin_setup("default")
    seq_len = BUILTINS["default"].seq_len
    rows = []
    for name in args.teachers:
        teacher = teacher_dir(name, args.work, builtin)
        blocks = dev_blocks(builtin, teacher, seq_len, args.dev_blocks)
        config = json.loads((teacher / "config.json").read_text())
        for unit in args.units:
            for norm in args.norms:
                tag = f"{name}-{unit}-{norm}"
                pruned = args.work / "pruned" / tag
                started = time.perf_counter()
                if not (pruned / "pruning.json").is_file():
                    engine.prune(teacher, builtin / "train.txt", pruned, grid=GRID, calib_samples=64, seq_len=seq_len,
                                 attention_unit=unit, attention_norm=norm)
                plan = engine.PruningPlan.load(pruned)
                shots = one_shot(pruned, blocks)
                kd = {s: short_kd(pruned, builtin, args.work / "kd" / f"{tag}-{s}", args.max_steps, s)
                      for s in KD_SPARSITIES}
                for permille, shot in shots.items():
                    candidate = next(r for r in plan.candidates if round(r["sparsity"] * 1000) == permille)
                    rows.append({
                        "teacher": name, "kv_groups": config["num_key_value_heads"],
                        "query_heads": config["num_attention_heads"], "attention_unit": unit, "attention_norm": norm,
                        "sparsity": permille / 1000, "kept_heads": candidate["kept_heads"],
                        "kept_kv_heads": candidate["kept_kv_heads"], "attention_units": candidate["attention_units"],
                        "parameters": candidate["parameters"], **shot, **kd.get(permille, {}),
                    })
                    print(json.dumps(rows[-1]), flush=True)
                print(f"{tag}: {time.perf_counter() - started:.0f} s", flush=True)
    stamp = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "device": platform.processor() or "cpu",
             "torch": torch.__version__, "transformers": transformers.__version__, "dev_blocks": args.dev_blocks,
             "seq_len": seq_len}
    if not args.no_csv:
        print("appended to", append_rows("attention_units.csv", [{**stamp, **row} for row in rows]))
    print("\n| teacher | unit | norm | s | kept heads (KV) | one-shot dev ppl | one-shot dev acc | KD dev acc "
          "| KD test acc |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        kd = (f"{r['kd_dev_acc']:.4f} | {r['kd_test_acc']:.4f}" if "kd_dev_acc" in r else " | ")
        print(f"| {r['teacher']} | {r['attention_unit']} | {r['attention_norm']} | {r['sparsity']:g} | "
              f"{r['kept_heads']} ({r['kept_kv_heads']}) | {r['one_shot_ppl']:.1f} | {r['one_shot_acc']:.4f} | {kd} |")


if __name__ == "__main__":
    main()
