"""Choosing and printing a placement: the recommendation, its DeepSpeed config, what to change when nothing
fits, `minidisc plan`'s output."""
from __future__ import annotations

import json
from dataclasses import asdict, replace

from engine.cli.memory_plan.estimate import (
    GIB,
    HEADROOM,
    Cluster,
    Placement,
    PlanOptions,
    loss_buffer_bytes,
    plan_memory,
)
from engine.cli.memory_plan.shapes import (
    largest_layer_parameters,
    load_model_config,
    parameter_count,
    width_parameters,
)
from engine.core.errors import UserError
from engine.core.widths import DEFAULT_GRID, PERMILLE, format_sparsity, parse_grid, parse_sparsity
from engine.models.families import family_for

WHY_TEACHER = {"replicated": "an exact teacher without ZeRO-3 gathers", "zero3": "an exact teacher (sharded)",
               "int8": "an int8 teacher (quantised: its outputs differ slightly)",
               "nf4": "an nf4 teacher (quantised: its outputs differ slightly)"}


WHY_TRAINED = {"adamw": "full-precision AdamW, nothing offloaded", "adamw8bit": "8-bit AdamW moments, nothing "
               "offloaded", "offload-opt": "the optimiser offloaded to the CPU (slower steps)",
               "offload-all": "parameters and optimiser offloaded to the CPU (slowest)"}


def recommend(rows: list[Placement]) -> tuple[Placement | None, str]:
    """The most preferred placement that fits, and why in one line (None when nothing fits)."""
    fitting = sorted((row for row in rows if row.fits), key=lambda row: row.preference)
    if not fitting:
        smallest = min(rows, key=lambda row: row.total_bytes)
        return None, (f"nothing fits: the smallest placement ({smallest.name}) needs "
                      f"{smallest.total_bytes / GIB:.1f} GiB per GPU, {smallest.usable_bytes / GIB:.1f} GiB usable")
    best = fitting[0]
    skipped = [row.name for row in rows if row.preference < best.preference and not row.fits]
    reason = (f"{best.name}: {WHY_TEACHER[best.teacher]} and {WHY_TRAINED[best.trained]}; uses "
              f"{best.total_bytes / GIB:.1f} of {best.usable_bytes / GIB:.1f} usable GiB per GPU")
    verb = "does" if len(skipped) == 1 else "do"
    return best, reason + (f" ({', '.join(skipped)} {verb} not fit)" if skipped else "")


def ds_config_for(best: Placement) -> dict:
    """The `minidisc compress` options that run a placement."""
    train = {"adamw": "ds_configs/zero3_train.json", "adamw8bit": "ds_configs/zero3_train.json",
             "offload-opt": "ds_configs/zero3_train_offload_optimizer.json",
             "offload-all": "ds_configs/zero3_train_offload.json"}[best.trained]
    options = [f"--deepspeed {train}", f"--teacher-placement {best.teacher}"]
    if best.teacher == "zero3":
        options.append("--teacher-deepspeed ds_configs/zero3_inference.json")
    if best.trained == "adamw8bit":
        options.append("--optimizer adamw8bit")
    return {"deepspeed": train, "teacher_deepspeed": "ds_configs/zero3_inference.json" if best.teacher == "zero3"
            else None, "options": " ".join(options)}


MAX_NODES_FACTOR = 64  # how far `advice` looks for a node count that fits


def _smallest(config, cluster: Cluster, options: PlanOptions) -> Placement:
    """The recommended placement, or the one needing the least memory when nothing fits."""
    rows = plan_memory(config, cluster, options)
    return recommend(rows)[0] or min(rows, key=lambda row: row.total_bytes)


def _more_nodes(config, cluster: Cluster, options: PlanOptions) -> tuple[Cluster, Placement]:
    """The fewest nodes (up to MAX_NODES_FACTOR x) at which something fits, keeping the micro-batch."""
    micro = options.micro_batch(cluster)
    for nodes in range(cluster.nodes + 1, MAX_NODES_FACTOR * cluster.nodes + 1):
        more = replace(cluster, nodes=nodes)
        row = _smallest(config, more, replace(options, batch_size=micro * more.gpus * options.grad_accum))
        if row.fits:
            break
    return more, row


def _verdict(row: Placement) -> str:
    return f"fits ({row.name})" if row.fits else f"still needs {row.total_bytes / GIB:.1f} GiB"


def _most_stacked(config, cluster: Cluster, options: PlanOptions) -> PlanOptions:
    """The options with the most widths per forward, fewer than now, that fit (else one width per forward)."""
    for n in range(len(options.widths_held) - 1, 1, -1):
        fewer = replace(options, stack_widths=n)
        if _smallest(config, cluster, fewer).fits:
            return fewer
    return replace(options, stack_widths=1)


def advice(config, cluster: Cluster, options: PlanOptions) -> list[str]:
    """What to change when nothing fits: each remedy alone, then all together, with whether it is enough.
    More GPUs keep the micro-batch (the global batch grows with them)."""
    tips = []
    more, row = _more_nodes(config, cluster, options)
    tips.append(f"more GPUs: {_verdict(row)} at {more.nodes} nodes x {cluster.gpus_per_node} GPUs")
    lean = options
    if options.micro_batch(cluster) > 1:
        lean = replace(lean, batch_size=cluster.gpus * options.grad_accum)
        tips.append(f"--batch-size {lean.batch_size} (micro-batch 1): {_verdict(_smallest(config, cluster, lean))}")
    if len(options.widths_held) > 1:
        stacked = _most_stacked(config, cluster, options)
        tips.append(f"--stack-widths {stacked.stack_widths}: {_verdict(_smallest(config, cluster, stacked))}")
        lean = replace(lean, stack_widths=1)
    if not options.gradient_checkpointing:
        checkpointed = replace(options, gradient_checkpointing=True)
        tips.append(f"--gradient-checkpointing: {_verdict(_smallest(config, cluster, checkpointed))}")
        lean = replace(lean, gradient_checkpointing=True)
    if lean != options and not any(tip.split(": ", 1)[1].startswith("fits") for tip in tips):
        more, row = _more_nodes(config, cluster, lean)
        tips.append(f"all of the above with more GPUs: {_verdict(row)} at {more.nodes} nodes x "
                    f"{cluster.gpus_per_node} GPUs")
    return tips


def faster_options(config, cluster: Cluster, options: PlanOptions) -> tuple[PlanOptions, list[str]] | None:
    """When what fits offloads or quantises (or nothing fits), the cheapest change of options with which a fast
    placement fits: fewer widths per forward (the same compute in smaller matmuls, the most that fit), else
    gradient checkpointing (about one more forward per step), else both. None when no change is needed or none
    is enough."""
    def fast(changed: PlanOptions) -> bool:
        row = recommend(plan_memory(config, cluster, changed))[0]
        return row is not None and row.fast

    if fast(options):
        return None
    stacks = range(len(options.widths_held) - 1, 0, -1)  # fewer widths per forward than now
    tries = [(replace(options, stack_widths=n), [f"--stack-widths {n}"]) for n in stacks]
    if not options.gradient_checkpointing:
        checkpointed = replace(options, gradient_checkpointing=True)
        tries.append((checkpointed, ["--gradient-checkpointing"]))
        tries += [(replace(checkpointed, stack_widths=n), ["--gradient-checkpointing", f"--stack-widths {n}"])
                  for n in stacks]
    return next(((changed, flags) for changed, flags in tries if fast(changed)), None)


def plan_report(config, cluster: Cluster, options: PlanOptions, model: str) -> dict:
    """Everything `minidisc plan` shows, as JSON-friendly data. When the options as given fit only slowly (or not
    at all) and a change of options lets a fast placement fit, the plan is of the changed options and says so."""
    as_given, changed = recommend(plan_memory(config, cluster, options))[0], []
    if faster := faster_options(config, cluster, options):
        options, changed = faster
    rows = plan_memory(config, cluster, options)
    best, reason = recommend(rows)
    if changed:
        before = f"only {as_given.name} fits" if as_given else "nothing fits"
        reason += f"; with {' and '.join(changed)} (as given, {before})"
    tokens = options.micro_batch(cluster) * options.seq_len
    total = parameter_count(config)
    return {
        "model": model,
        "family": family_for(config).name,
        "cluster": {**asdict(cluster), "gpus": cluster.gpus, "usable_bytes": cluster.usable_bytes,
                    "headroom": HEADROOM},
        "run": {"micro_batch": options.micro_batch(cluster), "seq_len": options.seq_len,
                "grad_accum": options.grad_accum, "gradient_checkpointing": options.gradient_checkpointing,
                "stack_widths": options.stack_widths, "widths_per_forward": len(options.widths_held),
                "candidates": [format_sparsity(s) for s in options.candidates],
                "widths_per_step": options.widths_per_step, "tokens_per_micro_batch": tokens},
        "parameters": {"teacher": total, "supernet": total, "largest_layer": largest_layer_parameters(config),
                       "candidates": [{"sparsity": s / PERMILLE, "parameters": width_parameters(config, s),
                                       "fraction": width_parameters(config, s) / total}
                                      for s in options.candidates]},
        "loss_buffers": loss_buffer_bytes(config, tokens, len(options.widths_held)),
        "placements": [row.to_dict() for row in rows],
        "recommended": best.name if best else None,
        "reason": reason,
        "changed_options": changed,
        "as_given": as_given.name if as_given else None,
        "ds_config": ds_config_for(best) if best else None,
        "advice": [] if best else advice(config, cluster, options),
        "pruning": pruning_report(config, cluster, options),
    }


def pruning_report(config, cluster: Cluster, options: PlanOptions) -> dict:
    """The importance pass before training, as `compress` runs it on this cluster, and what to change if it does
    not fit: a smaller calibration batch (`minidisc prune --calib-batch-size`, then compress its output), more GPUs."""
    from engine.cli.memory_plan.pruning import longest_fitting, pruning_memory
    from engine.pruning.prune import calibration_batch

    batch = calibration_batch(options.batch_size or cluster.gpus, options.seq_len)
    memory = pruning_memory(config, cluster, batch, options.seq_len)
    out = {"calibration_batch": batch, "teacher_bytes": memory.teacher_bytes,
           "activation_bytes": memory.activation_bytes, "logit_bytes": memory.logit_bytes,
           "total_bytes": memory.total_bytes, "fits": memory.fits, "cpu_node_bytes": memory.cpu_node_bytes,
           "advice": []}
    if not memory.fits:
        seq_len = longest_fitting(options.seq_len, lambda length: pruning_memory(config, cluster, 1, length).fits)
        out["command"] = f"minidisc prune --calib-batch-size 1 --calib-seq-len {seq_len}"
        out["advice"].append(f"`{out['command']}` first, then compress its output: "
                             f"{_verdict_bytes(pruning_memory(config, cluster, 1, seq_len))}")
        for nodes in range(cluster.nodes + 1, MAX_NODES_FACTOR * cluster.nodes + 1):
            if pruning_memory(config, replace(cluster, nodes=nodes), batch, options.seq_len).fits:
                out["advice"].append(f"more GPUs: fits at {nodes} nodes x {cluster.gpus_per_node} GPUs")
                break
    return out


def _verdict_bytes(memory) -> str:
    return "fits" if memory.fits else f"still needs {memory.total_bytes / GIB:.1f} GiB"


def _gib(nbytes: int) -> str:
    return f"{nbytes / GIB:.1f}"


def print_plan(report: dict) -> None:
    import sys

    from rich.console import Console
    from rich.table import Table

    # Results go to stdout (logs to stderr); piped output gets room for every column.
    console = Console() if sys.stdout.isatty() else Console(width=120)
    cluster, run = report["cluster"], report["run"]
    params = Table(title=f"Parameters of {report['model']} ({report['family']})")
    for column in ("model", "sparsity", "parameters", "of teacher"):
        params.add_column(column, justify="right")
    params.add_row("teacher = supernet", "0", f"{report['parameters']['teacher']:,}", "100.0%")
    for row in report["parameters"]["candidates"]:
        params.add_row("candidate", f"{row['sparsity']:g}", f"{row['parameters']:,}", f"{row['fraction']:.1%}")
    console.print(params)
    table = Table(title=f"Per-GPU memory (GiB) on {cluster['nodes']} x {cluster['gpus_per_node']} GPUs of "
                  f"{cluster['gpu_memory_gib']:g} GiB ({cluster['usable_bytes'] / GIB:.1f} usable)")
    columns = ("teacher / trained", "teacher", "params+grads", "optimizer", "activations", "loss bufs", "opt step",
               "total", "fits", "CPU/node")  # CPU per node, not per GPU
    for column in columns:
        table.add_column(column, justify="left" if column == columns[0] else "right")
    for row in report["placements"]:
        mark = " *" if row["name"] == report["recommended"] else ""
        table.add_row(row["name"] + mark, *(_gib(row[key]) for key in ("teacher_bytes", "params_grads_bytes",
                      "optimizer_bytes", "activation_bytes", "loss_bytes", "step_bytes", "total_bytes")),
                      "yes" if row["fits"] else "no", _gib(row["cpu_per_node_bytes"]),
                      style="bold green" if mark else None)
    console.print(table)
    console.print("total = teacher + params+grads + optimizer + the larger of activations + loss bufs and the "
                  "optimizer step's fp32 gradients (never alive together); offload-opt: optimizer states and fp32 "
                  "gradients in CPU memory; offload-all: the bf16 parameters too; CPU/node includes DeepSpeed's 1.5x "
                  "pinned-buffer factor")
    console.print(f"micro-batch {run['micro_batch']} x {run['seq_len']} tokens, {len(run['candidates'])} candidate "
                  f"widths ({', '.join(run['candidates'])}), {run['widths_per_step']} trained per step"
                  f", {run['widths_per_forward']} per forward"
                  f"{', gradient checkpointing' if run['gradient_checkpointing'] else ''}")
    if report["recommended"]:
        ds = report["ds_config"]
        stacked = f" --stack-widths {run['stack_widths']}" if run["stack_widths"] else ""
        console.print(f"recommended: {report['reason']}")
        console.print(f"run it with: minidisc compress {ds['options']}"
                      f"{' --gradient-checkpointing' if run['gradient_checkpointing'] else ''}{stacked} ...")
    else:
        console.print(f"[bold red]{report['reason']}[/]; what to change:")
        for tip in report["advice"]:
            console.print(f"  - {tip}")
    prune = report["pruning"]
    console.print(f"pruning before training (importance, {prune['calibration_batch']} x {run['seq_len']} tokens a "
                  f"batch): {_gib(prune['total_bytes'])} GiB per GPU (teacher {_gib(prune['teacher_bytes'])} + "
                  f"activations {_gib(prune['activation_bytes'])} + logits {_gib(prune['logit_bytes'])}): "
                  f"{'fits' if prune['fits'] else 'DOES NOT FIT'}; rank 0's node also holds what it writes of the "
                  f"reordered teacher ({_gib(prune['cpu_node_bytes'])} GiB)")
    for tip in prune["advice"]:
        console.print(f"  - {tip}")


def options_from_args(args) -> tuple[Cluster, PlanOptions]:
    from engine.config import PLAN_FIELDS, resolve_some

    cfg = resolve_some(args, PLAN_FIELDS)
    nodes, gpus, memory = cfg.cluster_shape() if cfg.cluster else (1, 1, None)
    given = lambda value, default: default if value is None else value  # noqa: E731  (flags beat --cluster)
    memory = given(args.gpu_memory, memory)
    if memory is None:
        raise UserError("give --gpu-memory GIB (the memory of one GPU) or --cluster NODESxGPUSxGIB")
    cluster = Cluster(given(args.nodes, nodes), given(args.gpus_per_node, gpus), memory, args.cpu_memory)
    options = PlanOptions(target=parse_sparsity(cfg.target_sparsity), truncate=parse_sparsity(cfg.truncate),
                          grid=parse_grid(cfg.grid) if cfg.grid else DEFAULT_GRID, batch_size=cfg.batch_size,
                          seq_len=cfg.seq_len, grad_accum=cfg.grad_accum, sandwich_sample=cfg.sandwich_sample,
                          gradient_checkpointing=cfg.gradient_checkpointing, stack_widths=cfg.stack_widths)
    return cluster.validate(), options.validate()


def run_plan(args) -> dict:
    """`minidisc plan`: print the plan (a table, or JSON with --json) and return it."""
    cluster, options = options_from_args(args)
    report = plan_report(load_model_config(args.model), cluster, options, args.model)
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print_plan(report)
    return report
