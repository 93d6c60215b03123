"""`minidisc prune`: importance on calibration data, reordering, and the candidate grid (step 1)."""
from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import torch

from engine.core import distributed as dist
from engine.core.errors import UserError
from engine.core.hub import model_folder, public_name
from engine.core.outputs import atomic_output_dir
from engine.core.provenance import model_source
from engine.core.widths import DEFAULT_GRID, PERMILLE, format_sparsity
from engine.data import parse_sources
from engine.data.splits import calibration_blocks
from engine.models.export import CheckpointTensors, skeleton
from engine.models.families import ATTENTION_UNITS, family_for
from engine.models.loading import check_checkpoint, checkpoint_dtype, load_causal_lm
from engine.models.plan import PruningPlan
from engine.models.units import count_parameters
from engine.pruning.importance import normalize_per_layer, unit_importance
from engine.pruning.reorder import reorder, write_reordered
from engine.training import memory
from engine.training.engines import load_partitioned, release

log = logging.getLogger(__name__)


def candidate_rows(plan: PruningPlan, model, family) -> list[dict]:
    """One row per grid sparsity: kept units per layer and in total, parameters, scale."""
    full = count_parameters(model, family, plan.full_shape)
    rows = []
    for permille in plan.grid:
        shape = plan.shape(permille)
        params = count_parameters(model, family, shape)
        rows.append({
            "sparsity": float(format_sparsity(permille)),
            "scale": (PERMILLE - permille) / PERMILLE,
            "attention_units": list(shape.attention),
            "ffn_neurons": list(shape.ffn),
            "kept_heads": sum(family.heads(kept)[0] for kept in shape.attention),
            "kept_kv_heads": sum(family.heads(kept)[1] for kept in shape.attention),
            "kept_neurons": sum(shape.ffn),
            "parameters": params,
            "parameter_fraction": params / full,
        })
    return rows


NORMS = {"layer": normalize_per_layer, "none": list}  # --attention-norm
CALIBRATION_BATCH, CALIBRATION_TOKENS = 4, 2048  # per importance batch in `compress`: sequences, tokens at most


def calibration_batch(batch_size: int, seq_len: int) -> int:
    """Sequences per importance batch in a `compress` run: 4, at most its --batch-size and 2,048 tokens. The backward
    to the masks keeps a full-width model's activations (~60 GB for LLaMA-3-8B at 8k tokens, `minidisc plan`)."""
    return max(1, min(CALIBRATION_BATCH, batch_size, CALIBRATION_TOKENS // seq_len))


def _ranked(family, raw: list[torch.Tensor], norm: str = "layer") -> tuple[list[torch.Tensor], list[list[float]]]:
    """(the orders `reorder` takes, normalised scores in descending order) per layer, from raw importance. With
    query-head units (`family` given and using them) the raw scores are per head: `reorder` sorts each KV group's
    heads, and the units' scores (`Family.unit_scores`) are already descending."""
    if family is not None and family.query_head_units:
        orders, unit_scores = zip(*(family.unit_scores(s) for s in raw))
        return list(orders), [s.tolist() for s in NORMS[norm](list(unit_scores))]
    scores = NORMS[norm](raw)
    orders = [torch.sort(s, descending=True, stable=True).indices for s in scores]
    return orders, [s[o].tolist() for s, o in zip(scores, orders)]


def prune_teacher(model, tokenizer, calibration: torch.Tensor, *, grid=DEFAULT_GRID, ffn_multiple: int = 8,
                  batch_size: int = 4, attention_norm: str = "layer") -> PruningPlan:
    """Score, rank and reorder `model` in place on token blocks [n, T]; returns the pruning plan. `attention_norm`:
    `layer` divides each layer's attention scores by their L2 norm before the global ranking (FFN scores always
    are); `none` ranks them as measured, which keeps the differences between layers that have few units (better
    one-shot, worse at 0.9 after training on the built-in teacher: docs/studies.md, "Attention units under GQA")."""
    family = family_for(model.config)
    raw_attention, raw_ffn = unit_importance(model, family, list(calibration.split(batch_size)))
    return reordered_plan(model, raw_attention, raw_ffn, grid=grid, ffn_multiple=ffn_multiple,
                          attention_norm=attention_norm)


def reordered_plan(model, raw_attention, raw_ffn, *, grid=DEFAULT_GRID, ffn_multiple: int = 8,
                   attention_norm: str = "layer") -> PruningPlan:
    """Rank the units by their raw importance, reorder `model` in place (most important first) and return the plan."""
    family = family_for(model.config)
    attention_orders, attention_scores = _ranked(family, raw_attention, attention_norm)
    ffn_orders, ffn_scores = _ranked(None, raw_ffn)
    reorder(model, family, attention_orders, ffn_orders)
    plan = PruningPlan(
        family=family.name,
        attention_scores=attention_scores,
        ffn_scores=ffn_scores,
        query_heads_per_unit=family.query_heads_per_unit,
        attention_unit=family.attention_unit,
        grid=tuple(grid),
        ffn_multiple=ffn_multiple,
    )
    plan.candidates = candidate_rows(plan, model, family)
    plan.extra["attention_norm"] = attention_norm
    plan.extra["original_index"] = {"attention": [o.tolist() for o in attention_orders],
                                    "ffn": [o.tolist() for o in ffn_orders]}
    return plan


def prune(teacher: str | Path, data, out: str | Path, *, grid=DEFAULT_GRID, calib_samples: int = 64,
          seq_len: int = 512, batch_size: int = 4, ffn_multiple: int = 8, text_field: str = "text", seed: int = 0,
          device: str = "cpu", attention_unit: str = "kv-group", attention_norm: str = "layer",
          ds_config: dict | None = None) -> PruningPlan | None:
    """Prune a teacher checkpoint directory on calibration data (--data sources: a path, or a list of paths and
    PATH@WEIGHT strings) and write the reordered teacher to `out`. `attention_unit`: `kv-group` or `query-head`
    (`engine.models.families`); the choice is written into the reordered teacher's config. `attention_norm`:
    see `prune_teacher`.

    On one process the teacher is scored whole on `device` (in its checkpoint's dtype on a GPU, fp32 on a CPU).
    Under a launcher every rank calls this: rank 0 tokenises the calibration data once, the teacher is scored
    partitioned over all ranks by ZeRO-3 under `ds_config` (`sharded_importance`), and rank 0 alone writes it
    reordered, a tensor at a time from the checkpoint (the plan is returned there, None elsewhere)."""
    if calib_samples < 1 or seq_len < 2 or batch_size < 1 or ffn_multiple < 1:
        raise UserError("--calib-samples, --calib-batch-size and --ffn-multiple must be >= 1 and --calib-seq-len >= 2")
    if attention_unit not in ATTENTION_UNITS:
        raise UserError(f"--attention-unit {attention_unit}: choose one of {', '.join(ATTENTION_UNITS)}")
    if attention_norm not in NORMS:
        raise UserError(f"--attention-norm {attention_norm}: choose one of {', '.join(NORMS)}")
    started = time.perf_counter()
    teacher = model_folder(str(teacher))
    # Check everything cheap (config, tokenizer, data) before reading the weights.
    config, tokenizer = check_checkpoint(teacher, seq_len, flag="--calib-seq-len")
    sources = parse_sources(data)
    with dist.main_first("tokenising the calibration data") as main:
        calibration = calibration_blocks(sources, text_field, tokenizer, seq_len, calib_samples, seed) if main else None
    calibration = dist.from_main(calibration)
    batches = list(calibration.split(batch_size))
    unit = attention_unit if attention_unit == "query-head" and family_for(config).query_heads_per_group > 1 else None
    log.info("calibrating on %d blocks of %d tokens from %s", len(calibration), seq_len,
             ", ".join(s.path for s in sources))
    scoring_device = device if dist.world_size() == 1 else None  # a launch scores on each rank's own device
    memory.reset_peak(scoring_device)
    raw, model = _scores(teacher, config, batches, unit, device, ds_config)  # rank 0's model: on meta if partitioned
    scored, scoring_memory = time.perf_counter(), memory.usage(scoring_device)
    plan = None
    with dist.main_first("writing the pruned teacher") as main:
        if main:
            _set_attention_unit(model, unit)
            plan = reordered_plan(model, *raw, grid=grid, ffn_multiple=ffn_multiple, attention_norm=attention_norm)
            plan.extra["calibration"] = {"data": [{**vars(s), "path": public_name(s.path)} for s in sources],
                                         "samples": len(calibration), "seq_len": seq_len, "seed": seed,
                                         "text_field": text_field, "processes": dist.world_size()}
            plan.extra["source"] = model_source(teacher)  # the original's name and license, for what follows
            with atomic_output_dir(out, kind="pruned-teacher") as scratch:
                if _streamable(model, teacher):  # the reordering `reordered_plan` did on meta, done to the files
                    original = plan.extra["original_index"]
                    write_reordered(teacher, model, family_for(model.config), original["attention"], original["ffn"],
                                    scratch)
                    model.config.save_pretrained(scratch)
                    if (Path(teacher) / "generation_config.json").is_file():
                        shutil.copy2(Path(teacher) / "generation_config.json", scratch)
                else:
                    model.to("cpu", checkpoint_dtype(config)).save_pretrained(scratch)
                tokenizer.save_pretrained(scratch)
                plan.extra["timing"] = {"importance": round(scored - started, 2),
                                        "save": round(time.perf_counter() - scored, 2)}
                plan.extra["memory"] = {"scoring": scoring_memory}  # rank 0's, as `minidisc plan` counts per GPU
                plan.save(scratch)
            log.info("wrote the reordered teacher and pruning.json to %s (importance took %.1f s, peak %s MB: %s)",
                     out, plan.extra["timing"]["importance"], scoring_memory["peak_mb"], scoring_memory["kind"])
    return plan


def _scores(teacher: str, config, batches: list[torch.Tensor], unit: str | None, device: str, ds_config: dict | None):
    """(raw importance, the teacher to reorder: on rank 0 only). One process scores the whole teacher on `device`
    (its checkpoint's dtype on a GPU, fp32 on a CPU) and reorders that copy; under a launcher the ranks score it
    partitioned, and rank 0 gets its structure on the meta device (`write_reordered` reads the weights one tensor
    at a time), or, for a checkpoint not in safetensors under the model's names, loads it whole on the CPU."""
    if dist.world_size() > 1:
        batch_size = len(batches[0])
        raw = sharded_importance(Path(teacher), _frozen_config(ds_config, config, batch_size), batches, unit)
        if not dist.is_main():
            return raw, None
        _, _, structure = skeleton(teacher)
        return raw, (structure if _streamable(structure, teacher) else
                     load_causal_lm(teacher, dtype=checkpoint_dtype(config)))
    dtype = torch.float32 if torch.device(device).type == "cpu" else checkpoint_dtype(config)
    model = load_causal_lm(teacher, dtype=dtype).to(device)
    _set_attention_unit(model, unit)
    return unit_importance(model, family_for(model.config), batches), model


def _streamable(model, teacher) -> bool:
    """Whether `model` is a structure on the meta device whose every tensor the checkpoint holds under its name."""
    if not next(model.parameters()).is_meta:
        return False
    try:
        stored = CheckpointTensors(teacher).files
    except (OSError, KeyError, ValueError):
        return False
    return all(name in stored for name in _stored_names(model))


def _stored_names(model) -> list[str]:
    """The state-dict names a checkpoint stores (a tensor tied to an earlier one, like a tied LM head, once)."""
    first = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        first.setdefault(id(tensor), name)
    return list(first.values())


def sharded_importance(directory: Path, ds_config: dict, batches: list[torch.Tensor], attention_unit: str | None):
    """Pruning's unit importance with the teacher partitioned over every rank by ZeRO-3, so no device ever holds it
    whole: each rank scores every world_size-th calibration batch (the single-process order's batches, so the sum
    is the same), and the |dL/dmask| sums are added over ranks. A rank with one batch fewer runs a copy of its
    first uncounted: every rank must make the same ZeRO-3 gathers. Masks are tiny and replicated; the weights
    take no gradient."""
    import deepspeed

    model, keep_alive = load_partitioned(directory, ds_config)
    if attention_unit:
        model.config.minidisc_attention_unit = attention_unit
    model.requires_grad_(False)
    engine, *_ = deepspeed.initialize(model=model, config=ds_config)
    try:
        rank, ranks = dist.rank(), dist.world_size()
        mine, per_rank = batches[rank::ranks], -(-len(batches) // ranks)
        counted = [True] * len(mine) + [False] * (per_rank - len(mine))
        mine += [batches[0]] * (per_rank - len(mine))
        attention, ffn = unit_importance(engine.module, family_for(model.config), mine, counted=counted)
        return [dist.all_sum(t) for t in attention], [dist.all_sum(t) for t in ffn]
    finally:
        release(engine)
        del keep_alive


def _set_attention_unit(model, unit: str | None) -> None:
    if unit:
        model.config.minidisc_attention_unit = unit  # (without GQA a query head is a KV group)
    elif hasattr(model.config, "minidisc_attention_unit"):  # a teacher that is itself an export of a pruned one
        del model.config.minidisc_attention_unit


def _frozen_config(ds_config: dict | None, config, batch_size: int) -> dict:
    """The DeepSpeed config the partitioned teacher is scored under: ZeRO-3 (`ds_config`, default the shipped
    inference one), in the checkpoint's dtype on GPUs (bf16 where it is), fp32 on CPUs."""
    from engine.config import DS_CONFIGS
    from engine.training.deepspeed_config import frozen_ds_config, read_ds_config

    bf16 = torch.cuda.is_available() and checkpoint_dtype(config) == torch.bfloat16
    return frozen_ds_config(ds_config or read_ds_config(DS_CONFIGS / "zero3_inference.json"), batch_size, bf16)
