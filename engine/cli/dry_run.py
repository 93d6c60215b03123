"""`minidisc compress|distill|maxidisc --dry-run`: check a recipe against the model's config and print what the
run would do, without reading weights or data.

Checked, with the same one-line errors as a real run: the teacher's config.json (a supported family) and its
tokenizer, --seq-len against the positions, the data paths and formats, both DeepSpeed JSONs and --optimizer,
the target on a pruned teacher's grid, and, with --cluster NODESxGPUSxGIB, that --batch-size splits over
its GPUs and that the chosen placement fits their memory (`engine.cli.memory_plan`).
"""
from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from engine.cli.memory_plan import estimate as mp
from engine.cli.memory_plan.advice import pruning_report
from engine.cli.memory_plan.shapes import parameter_count, width_parameters
from engine.config import RunConfig, split_batch
from engine.core import faults
from engine.core.errors import UserError
from engine.core.widths import (
    PERMILLE,
    candidate_widths,
    forwards_per_batch,
    grid_with_target,
    joint_widths,
    parse_sparsity,
    past_target,
    widths_per_step,
)
from engine.data import resolve
from engine.models.plan import PLAN_FILE, PruningPlan
from engine.report.harness import check_tasks
from engine.schedule.setup import check_target_on_grid, check_teacher
from engine.training.deepspeed_config import bf16_enabled, offloaded, read_ds_config, train_ds_config
from engine.training.stage import TrainConfig


def _described(path: str, weight: float = 1.0) -> str:
    """A source's format and file count (`resolve` checks them without reading), e.g. "json, 12 files, weight 0.7"."""
    builder, files = resolve(path)
    count = "" if builder == "save_to_disk" or len(files) == 1 else f", {len(files)} files"
    return f"{builder}{count}" + (f", weight {weight:g}" if weight != 1 else "")


def dry_run(cfg: RunConfig, command: str) -> dict:
    """Validate and describe the run; returns what it printed as data."""
    config = check_teacher(cfg)
    faults.check_build_locks()
    data = {"data": [_described(s.path, s.weight) for s in cfg.sources()]}
    for name in ("dev_data", "test_data"):
        if getattr(cfg, name):
            data[name] = _described(getattr(cfg, name))
    grid = _grid(cfg)
    candidates = _candidates(cfg, config, grid)
    past = past_target(grid, parse_sparsity(cfg.target_sparsity), parse_sparsity(cfg.sparsest))
    per_step = widths_per_step(len(candidates) + len(past), cfg.sandwich_sample) if command == "compress" else 1
    backwards = forwards_per_batch(per_step, cfg.stack_widths)  # per micro-batch: DeepSpeed's accumulation steps
    read_ds_config(cfg.teacher_ds_config())
    train = train_ds_config(TrainConfig.of(cfg), backwards)  # readable, and compatible with --optimizer
    cluster = mp.Cluster(*cfg.cluster_shape()).validate() if cfg.cluster else None
    gpus = cluster.gpus if cluster else 1
    micro = split_batch(cfg.batch_size, gpus, cfg.grad_accum, "GPUs")
    summary = {"command": command, "teacher": cfg.teacher, "family": config.model_type,
            "parameters": parameter_count(config), "candidates": candidates, "data": data,
            "stages": _stages(cfg, command, candidates, per_step, grid),
            "deepspeed": {"train": str(cfg.train_ds_config()), "teacher": str(cfg.teacher_ds_config()),
                          "micro_batch": micro,
                          "gradient_accumulation_steps": backwards * cfg.grad_accum,
                          "bf16": bf16_enabled(train)}}
    if cluster:
        summary["memory"] = _memory(cfg, config, cluster, train, candidates)
        if not (Path(cfg.teacher) / PLAN_FILE).is_file():  # compress prunes it first, on the same GPUs
            options = mp.PlanOptions(batch_size=cfg.batch_size, seq_len=cfg.seq_len, grad_accum=cfg.grad_accum)
            summary["pruning"] = pruning_report(config, cluster, options)
    if cfg.eval_tasks:  # names and data, as the run checks them before training
        check_tasks(cfg.eval_tasks, cfg.eval_include)
    _print(summary, cfg)
    pruning = summary.get("pruning")
    if pruning and not pruning["fits"]:
        raise UserError(f"pruning the teacher needs {pruning['total_bytes'] / mp.GIB:.1f} GiB per GPU but "
                        f"{cfg.cluster} leaves {cluster.usable_bytes / mp.GIB:.1f} usable: run `{pruning['command']}` "
                        "first and give its output as --teacher, or use more GPUs (`minidisc plan` says how many)")
    if cluster and not summary["memory"]["fits"]:
        m = summary["memory"]
        raise UserError(f"the run needs {m['total_gib']:.1f} GiB per GPU but {cfg.cluster} leaves "
                        f"{m['usable_gib']:.1f} usable: see `minidisc plan {cfg.teacher} --nodes {cluster.nodes} "
                        f"--gpus-per-node {cluster.gpus_per_node} --gpu-memory {cluster.gpu_memory_gib:g}`")
    return summary


def _grid(cfg: RunConfig) -> tuple[int, ...]:
    """The pruned teacher's grid, or the one pruning would use."""
    if (Path(cfg.teacher) / PLAN_FILE).is_file():
        grid = PruningPlan.load(Path(cfg.teacher)).grid
        check_target_on_grid(cfg, grid, cfg.teacher)
        return grid
    return grid_with_target([parse_sparsity(s) for s in cfg.grid or []], parse_sparsity(cfg.target_sparsity),
                            parse_sparsity(cfg.sparsest))


def _candidates(cfg: RunConfig, config, grid) -> list[dict]:
    """The grid (the pruned teacher's, or the one pruning would use) between --truncate and the target, with
    parameter counts: a pruned teacher's exact ones (pruning.json holds what `minidisc prune` counted on the
    model); before pruning, the global share removed, which is exact with --ffn-multiple 1 and otherwise moves
    by the per-layer rounding of FFN removals (under --ffn-multiple / 2 neurons per layer)."""
    target, truncate = parse_sparsity(cfg.target_sparsity), parse_sparsity(cfg.truncate)
    exact = {}
    if (Path(cfg.teacher) / PLAN_FILE).is_file() and not cfg.uniform:  # the plan counted the per-layer widths
        exact = {parse_sparsity(row["sparsity"]): row["parameters"]
                 for row in PruningPlan.load(Path(cfg.teacher)).candidates}
    teacher = parameter_count(config)
    rows = []
    for s in candidate_widths(grid, truncate, target):
        parameters = exact.get(s, width_parameters(config, s))
        rows.append({"sparsity": s / PERMILLE, "parameters": parameters, "fraction": parameters / teacher,
                     "exact": s in exact or (cfg.ffn_multiple == 1 and not cfg.uniform
                                             and cfg.attention_unit == "kv-group")})
    return rows


def _stages(cfg: RunConfig, command: str, candidates: list[dict], widths_per_step: int, grid) -> list[dict]:
    """Each stage's widths per step and optimiser steps (None, with a note: known once pruned or once the pipeline
    has run). A joint student stage's widths depend on the TA: the most it can have (the densest TA's) is listed."""
    target = candidates[-1]["sparsity"]
    sandwich_steps = cfg.sandwich_steps or None  # --sandwich-share: from the pruned widths' FLOPs
    if command == "compress":
        student = ("chosen TA (or teacher) -> student", 1)
        if cfg.student_stage == "joint":
            tas = [round(c["sparsity"] * PERMILLE) for c in candidates[:-1]] or [None]
            most = max(len(joint_widths(grid, ta, round(target * PERMILLE), parse_sparsity(cfg.sparsest)))
                       for ta in tas)
            student = (f"chosen TA (or teacher) -> student + the widths past the TA (up to {most})", most)
        past = f" and the widths past the target up to {cfg.sparsest:g}" if cfg.sparsest > target else ""
        stages = [("sandwich", f"teacher -> every candidate{past}", widths_per_step, sandwich_steps),
                  ("student", *student, cfg.max_steps)]
        what = {"kd": "teacher -> student", "kd-matched": "teacher -> student, the pipeline's training FLOPs",
                "kd-steps": "teacher -> student, the pipeline's steps", "ce": "data -> student"}
        steps = {"kd-matched": None, "kd-steps": sandwich_steps and sandwich_steps + cfg.max_steps}
        stages += [(f"baseline-{b}", what[b], 1, steps.get(b, cfg.max_steps)) for b in cfg.baselines or []]
    elif command == "distill":
        stages = [("student", "teacher -> student", 1, cfg.max_steps)]
    else:
        stages = [(f"ta-{c['sparsity']:g} + student", "teacher -> TA -> student", 1, 2 * cfg.max_steps)
                  for c in candidates if c["sparsity"] != target]
        stages.append(("student-direct", "teacher -> student", 1, cfg.max_steps))
    notes = {"sandwich": f"{cfg.sandwich_share:g} of FLOPs"}
    return [{"stage": name, "what": what, "widths_per_step": k, "steps": steps,
             "tokens": None if steps is None else steps * cfg.batch_size * cfg.seq_len,
             **({} if steps else {"note": notes.get(name, "matched")})} for name, what, k, steps in stages]


def _memory(cfg: RunConfig, config, cluster: mp.Cluster, train: dict, candidates: list[dict]) -> dict:
    offload = offloaded(train)
    trained = ("offload-all" if "param" in offload else "offload-opt" if offload else
               "adamw8bit" if cfg.optimizer == "adamw8bit" else "adamw")
    options = mp.PlanOptions(target=round(candidates[-1]["sparsity"] * PERMILLE),
                             truncate=round(candidates[0]["sparsity"] * PERMILLE),
                             grid=tuple(round(c["sparsity"] * PERMILLE) for c in candidates),
                             batch_size=cfg.batch_size, seq_len=cfg.seq_len, grad_accum=cfg.grad_accum,
                             sandwich_sample=cfg.sandwich_sample,
                             gradient_checkpointing=cfg.gradient_checkpointing,
                             stack_widths=cfg.stack_widths).validate()
    row = mp.placement(config, cluster, options, cfg.teacher_placement, trained)
    gib = lambda n: round(n / mp.GIB, 2)  # noqa: E731
    return {"placement": row.name, "teacher_gib": gib(row.teacher_bytes), "params_grads_gib":
            gib(row.params_grads_bytes), "optimizer_gib": gib(row.optimizer_bytes),
            "activations_gib": gib(row.activation_bytes), "loss_gib": gib(row.loss_bytes),
            "step_gib": gib(row.step_bytes), "total_gib": gib(row.total_bytes), "usable_gib": gib(row.usable_bytes),
            "cpu_per_node_gib": gib(row.cpu_per_node_bytes), "fits": row.fits}


def _print(summary: dict, cfg: RunConfig) -> None:
    console = Console()
    console.print(f"[bold]dry run[/]: minidisc {summary['command']}, teacher {summary['teacher']} "
                  f"({summary['family']}, {summary['parameters']:,} parameters), target sparsity "
                  f"{cfg.target_sparsity:g}, out {cfg.out}")
    table = Table(title="candidate widths" if summary["command"] != "distill" else "widths")
    for column in ("sparsity", "parameters", "of teacher"):
        table.add_column(column, justify="right")
    for c in summary["candidates"]:
        approx = "" if c["exact"] else "~"
        table.add_row(f"{c['sparsity']:g}", f"{approx}{c['parameters']:,}", f"{approx}{c['fraction']:.1%}")
    if not all(c["exact"] for c in summary["candidates"]):
        table.caption = ("~: before pruning; each layer's FFN removals are then rounded to a multiple of "
                         "--ffn-multiple. `minidisc prune` prints the exact counts, and a dry run on its output "
                         "shows them")
    console.print(table)
    stages = Table(title="stages")
    for column in ("stage", "what", "widths per step", "steps", "tokens"):
        stages.add_column(column, justify="left" if column in ("stage", "what") else "right")
    for s in summary["stages"]:
        known = s["steps"] is not None
        stages.add_row(s["stage"], s["what"], str(s["widths_per_step"]), str(s["steps"]) if known else s["note"],
                       f"{s['tokens']:,}" if known else "—")
    console.print(stages)
    ds = summary["deepspeed"]
    teacher = (f"{ds['teacher']} (frozen teachers)" if cfg.teacher_placement == "zero3" else
               f"teachers: a {cfg.teacher_placement} copy per GPU")
    console.print(f"DeepSpeed: {ds['train']} (trained, bf16 {ds['bf16']}), {teacher}; micro-batch "
                  f"{ds['micro_batch']} per GPU, {ds['gradient_accumulation_steps']} micro-steps per optimiser step")
    if "memory" in summary:
        m = summary["memory"]
        console.print(f"memory on {cfg.cluster} ({m['placement']}): teacher {m['teacher_gib']:.1f} + params/grads "
                      f"{m['params_grads_gib']:.1f} + optimizer {m['optimizer_gib']:.1f} + the larger of activations "
                      f"{m['activations_gib']:.1f} + loss {m['loss_gib']:.1f} and the optimizer step's "
                      f"{m['step_gib']:.1f} = {m['total_gib']:.1f} GiB per GPU of "
                      f"{m['usable_gib']:.1f} usable: {'fits' if m['fits'] else 'DOES NOT FIT'}; CPU "
                      f"{m['cpu_per_node_gib']:.1f} GiB per node")
    else:
        console.print("memory: add cluster: NODESxGPUSxGIB to the recipe (or --cluster) to check it")
    if "pruning" in summary:
        p = summary["pruning"]
        console.print(f"pruning first: {p['total_bytes'] / mp.GIB:.1f} GiB per GPU "
                      f"({'fits' if p['fits'] else 'DOES NOT FIT'}); rank 0's node holds what it writes of the "
                      f"reordered teacher ({p['cpu_node_bytes'] / mp.GIB:.1f} GiB)")
    console.print("checks passed: config, tokenizer, data paths, DeepSpeed configs" +
                  (", batch split and memory" if "memory" in summary else "") +
                  (f"; evaluation tasks {', '.join(cfg.eval_tasks)} and their data" if cfg.eval_tasks else ""))
