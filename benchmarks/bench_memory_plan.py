"""`minidisc plan`'s per-GPU estimate against the measured peak of real sandwich steps on the same config.

Builds a model from a preset's config (random weights, bf16, fewer layers with --layers), prunes it on random
calibration tokens, then runs the engine's own sandwich step (engine.training.trainer.train_step on engines from
build_engines: the teacher in --teacher-placement, the ZeRO-3 supernet with AdamW) for --steps steps in one
process, and compares torch.cuda.max_memory_allocated over those steps with the plan's total for one GPU of this
device's memory (teacher + model states + activations + loss buffers; the plan's 10% headroom is not part of
either). The target is |measured / planned - 1| <= 0.15. Appends a row to benchmarks/results/memory_plan.csv.

    python benchmarks/bench_memory_plan.py                                  # opt-1.3b, batch 4 x 2048, stacked
    python benchmarks/bench_memory_plan.py --stack-widths 1 --gradient-checkpointing
    python benchmarks/bench_memory_plan.py --preset llama-2-7b --layers 8 --seq-len 1024

Without CUDA it runs the same steps on the CPU and prints the plan only (CPU memory is not what the plan counts):
a check that the script works, e.g. `--layers 2 --seq-len 64 --batch 1 --no-csv`.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = "memory_plan.csv"
GIB = 2**30


def pruned_model(preset: str, layers: int | None, directory: Path, grid) -> Path:
    """A random model of the preset's shapes, pruned (reordered) on random tokens and saved with its pruning.json."""
    from transformers import AutoModelForCausalLM

    import engine
    from engine.cli.memory_plan.shapes import preset_config

    config = preset_config(preset)
    if layers:
        config.num_hidden_layers = layers
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).to(device).eval()
    calibration = torch.randint(3, config.vocab_size, (2, 64), device=device)
    plan = engine.prune_teacher(model, None, calibration, grid=grid, batch_size=1)
    model.to("cpu").save_pretrained(directory)
    plan.save(directory)
    del model
    return directory


def measure(args, pruned: Path, ds_config: Path) -> dict:
    import engine
    from engine.config import RunConfig
    from engine.core import distributed as dist
    from engine.core.widths import forwards_per_batch
    from engine.data import Mixture
    from engine.distillation.loss import Objective
    from engine.training.batches import BatchOrder
    from engine.training.engines import build_engines, release
    from engine.training.stage import Stage, TrainConfig
    from engine.training.trainer import train_step

    dist.init()
    plan = engine.PruningPlan.load(pruned)
    cfg = RunConfig(teacher=str(pruned), data="-", out="-", max_steps=1000, warmup_ratio=0.0,
                    batch_size=args.batch, seq_len=args.seq_len, deepspeed=str(ds_config),
                    teacher_placement=args.teacher_placement, stack_widths=args.stack_widths,
                    gradient_checkpointing=args.gradient_checkpointing, target_sparsity=args.target, truncate=0.5)
    widths = [w for w in plan.grid if 500 <= w <= round(args.target * 1000)]
    stage = Stage("sandwich", pruned, pruned, widths, supernet=True, shapes={w: plan.shape(w) for w in widths})
    train = TrainConfig.of(cfg)
    teacher, engine_, distiller, keep_alive, _ = build_engines(
        stage, train, forwards_per_batch(len(widths), cfg.stack_widths))
    vocab = distiller.lm.config.vocab_size
    blocks = torch.randint(3, vocab, (args.batch * (args.steps + 1), args.seq_len),
                           generator=torch.Generator().manual_seed(0))
    order = BatchOrder(Mixture.of(blocks, seed=0))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    for step in range(args.steps):
        outcome = train_step(teacher, engine_, [order.batch(step, 0, train)], widths, Objective.of(cfg),
                             stage.shapes, per_forward=cfg.stack_widths)
        assert outcome.finite, outcome
    peak = torch.cuda.max_memory_allocated() if cuda else None
    release(teacher, engine_)
    return {"widths": widths, "measured_bytes": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="opt-1.3b", help="a `minidisc plan` preset (default opt-1.3b)")
    parser.add_argument("--layers", type=int, help="fewer decoder layers than the preset (a smaller model)")
    parser.add_argument("--batch", type=int, default=4, help="sequences per step (one process: the micro-batch)")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--target", type=float, default=0.9, help="target sparsity; candidates from 0.5 to it")
    parser.add_argument("--stack-widths", type=int, default=0, metavar="N")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--teacher-placement", default="replicated", choices=["replicated", "zero3"])
    parser.add_argument("--steps", type=int, default=2, help="measured sandwich steps (the first allocates Adam)")
    parser.add_argument("--no-csv", action="store_true", help="print only, append nothing")
    args = parser.parse_args()

    from engine.cli.memory_plan.estimate import Cluster, PlanOptions, _placement
    from engine.cli.memory_plan.shapes import preset_config
    from engine.core.widths import DEFAULT_GRID

    cuda = torch.cuda.is_available()
    gpu_gib = torch.cuda.get_device_properties(0).total_memory / GIB if cuda else 80.0
    config = preset_config(args.preset)
    if args.layers:
        config.num_hidden_layers = args.layers
    options = PlanOptions(target=round(args.target * 1000), truncate=500, batch_size=args.batch,
                          seq_len=args.seq_len, stack_widths=args.stack_widths,
                          gradient_checkpointing=args.gradient_checkpointing).validate()
    row = _placement(config, Cluster(1, 1, gpu_gib).validate(), options, args.teacher_placement, "adamw")
    ds = json.loads((REPO / "ds_configs" / "zero3_train.json").read_text())
    if not cuda:  # bf16 on a CPU is slow; the CPU run only checks that the steps run
        ds["bf16"] = {"enabled": False}
    with tempfile.TemporaryDirectory(prefix="bench-memory-plan-") as scratch:
        scratch = Path(scratch)
        (scratch / "ds.json").write_text(json.dumps(ds))
        pruned = pruned_model(args.preset, args.layers, scratch / "pruned", DEFAULT_GRID)
        result = measure(args, pruned, scratch / "ds.json")
    planned = row.total_bytes
    parts = {"teacher": row.teacher_bytes, "params_grads": row.params_grads_bytes, "optimizer": row.optimizer_bytes,
             "activations": row.activation_bytes, "loss": row.loss_bytes}
    device = torch.cuda.get_device_name() if cuda else "cpu"
    print(f"{device}: {args.preset}{f' ({args.layers} layers)' if args.layers else ''}, {args.teacher_placement} "
          f"teacher / ZeRO-3 AdamW, batch {args.batch} x {args.seq_len}, widths {result['widths']}, "
          f"--stack-widths {args.stack_widths}{', gradient checkpointing' if args.gradient_checkpointing else ''}")
    print("planned GiB: " + ", ".join(f"{k} {v / GIB:.2f}" for k, v in parts.items()) + f"; total {planned / GIB:.2f}")
    if result["measured_bytes"] is None:
        print("no CUDA: nothing measured (the plan counts GPU memory)")
        return
    measured = result["measured_bytes"]
    print(f"measured peak {measured / GIB:.2f} GiB: {measured / planned:.3f} x the plan (target 0.85-1.15)")
    if not args.no_csv:
        from results_csv import append_rows

        csv_row = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "device": device, "model": args.preset,
                   "layers": config.num_hidden_layers, "teacher_placement": args.teacher_placement,
                   "batch": args.batch, "seq_len": args.seq_len, "widths": " ".join(map(str, result["widths"])),
                   "stack_widths": args.stack_widths, "gradient_checkpointing": args.gradient_checkpointing,
                   **{f"planned_{k}_gib": round(v / GIB, 3) for k, v in parts.items()},
                   "planned_gib": round(planned / GIB, 3), "measured_gib": round(measured / GIB, 3),
                   "measured_vs_planned": round(measured / planned, 3), "torch": torch.__version__}
        print(f"appended a row to {append_rows(RESULTS, [csv_row])}")


if __name__ == "__main__":
    main()
