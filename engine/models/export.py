"""Export any width of a reordered model as a real, smaller Hugging Face checkpoint.

Per-layer widths use the MiniDisc config/model classes (registered with the Auto classes, and loadable
with trust_remote_code from the checkpoint alone); `uniform=True` keeps the same units in every layer and
writes a stock LlamaForCausalLM/OPTForCausalLM checkpoint.
"""
from __future__ import annotations

import json
import logging
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from engine.core.errors import UserError
from engine.core.hub import model_folder, public_name
from engine.core.outputs import atomic_output_dir
from engine.core.provenance import model_source
from engine.core.widths import Shape, format_sparsity, parse_sparsity
from engine.models.families import family_for
from engine.models.loading import checkpoint_dtype, load_causal_lm, load_config, load_tokenizer
from engine.models.model_card import write_model_card
from engine.models.modeling_minidisc import PER_LAYER_CLASSES
from engine.models.plan import PruningPlan
from engine.models.units import count_parameters, model_shape

log = logging.getLogger(__name__)
SUPERNET_FILE = "minidisc_supernet.json"  # beside a supernet's weights (OUT/supernet): the widths it trained

# save_pretrained copies the code of classes marked so (modeling_minidisc.py) into every per-layer export and
# lists it in the config's auto_map, so the export loads with trust_remote_code=True and without this package.
for _config, _model in PER_LAYER_CLASSES.values():
    _config.register_for_auto_class()
    _model.register_for_auto_class("AutoModelForCausalLM")


_DROP = ("model_type", "architectures", "auto_map", "transformers_version", "_name_or_path", "dtype",
         "kv_heads_per_layer", "query_heads_per_layer", "intermediate_sizes", "heads_per_layer", "ffn_dims")


def _is_uniform(shape: Shape) -> bool:
    return len(set(shape.attention)) == 1 and len(set(shape.ffn)) == 1


def pruned_config(config, family, shape: Shape, uniform: bool, dtype: torch.dtype = torch.float32):
    """The config of the model sliced to `shape`: stock when uniform, MiniDisc per-layer otherwise."""
    base = {k: v for k, v in config.to_dict().items() if k not in _DROP}
    base["dtype"] = str(dtype).removeprefix("torch.")
    return family.pruned_config(base, shape, uniform)


def _kept(group, kept: int, per_unit: int) -> slice | torch.Tensor:
    """The part of a coupled dimension that keeping `kept` units keeps: a prefix, or the indices of a prefix of
    every block (query-head units)."""
    return slice(0, kept * per_unit) if group.blocks == 1 else group.index(torch.arange(kept), per_unit)


def kept_regions(model, family, shape: Shape) -> dict[str, tuple]:
    """Per prunable tensor of `model` (reordered; the meta device will do), what `shape` keeps of it: per dimension
    a slice or a tensor of indices, for `tensor[region]`. `model` may be any width containing `shape`."""
    names = {id(module): name for name, module in model.named_modules()}
    regions = {}

    def keep_rows(linear, rows):
        regions[f"{names[id(linear)]}.weight"] = (rows, slice(None))
        if linear.bias is not None:
            regions[f"{names[id(linear)]}.bias"] = (rows,)

    for groups, kept_attn, kept_ffn in zip(family.groups(model), shape.attention, shape.ffn):
        for group, kept in zip(groups, (kept_attn, kept_ffn)):
            for linear, per_unit in group.rows:
                keep_rows(linear, _kept(group, kept, per_unit))
            for linear, per_unit in group.cols:
                regions[f"{names[id(linear)]}.weight"] = (slice(None), _kept(group, kept, per_unit))
            for linear in group.whole if kept == 0 else ():
                keep_rows(linear, slice(0, 0))
    return regions


@torch.no_grad()
def sliced_state_dict(model, family, shape: Shape, dtype: torch.dtype = torch.float32,
                      state: dict | None = None) -> dict[str, torch.Tensor]:
    """The full model's tensors with every prunable linear cut to the width's prefix (new storage).

    `state` (default `model.state_dict()`) may be a consolidated copy of the weights, e.g. gathered from a
    ZeRO-3 engine; `model` then only supplies the structure (which linears, how many rows per unit)."""
    state = dict(model.state_dict() if state is None else state)
    for name, region in kept_regions(model, family, shape).items():
        state[name] = state[name][region]
    return {name: tensor.detach().to(dtype, copy=True).contiguous() for name, tensor in state.items()}


class CheckpointTensors:
    """The tensors of a safetensors checkpoint folder, read one at a time and only the part asked for."""

    def __init__(self, directory: Path):
        directory, index = Path(directory), Path(directory) / "model.safetensors.index.json"
        if index.is_file():
            self.files = {name: directory / file for name, file in json.loads(index.read_text())["weight_map"].items()}
        else:
            from safetensors import safe_open

            with safe_open(directory / "model.safetensors", "pt") as f:
                self.files = dict.fromkeys(f.keys(), directory / "model.safetensors")

    def read(self, name: str, region: tuple) -> torch.Tensor:
        """The tensor's `region` (slices, or index tensors: read whole first) from the file."""
        from safetensors import safe_open

        with safe_open(self.files[name], "pt") as f:
            if all(isinstance(part, slice) for part in region):
                return f.get_slice(name)[region]
            return f.get_tensor(name)[region]


SHARD_BYTES = 2 * 2**30  # a streamed checkpoint's shards: what writing holds at once (twice: safetensors' bytes)


def save_tensors(tensors, folder: Path) -> None:
    """Write (name, tensor) pairs into `folder` as transformers does: one model.safetensors, or shards of about
    SHARD_BYTES with their index; only the shard being filled is held, so any model is written in bounded memory."""
    from safetensors.torch import save_file

    written, shard, size, total = [], {}, 0, 0

    def flush():
        path = folder / f".shard-{len(written):05d}"
        save_file(shard, str(path), metadata={"format": "pt"})
        written.append((path, list(shard)))
        shard.clear()

    for name, tensor in tensors:
        if shard and size + tensor.nbytes > SHARD_BYTES:
            flush()
            size = 0
        shard[name] = tensor.contiguous()
        size, total = size + tensor.nbytes, total + tensor.nbytes
    flush()
    if len(written) == 1:
        written[0][0].rename(folder / "model.safetensors")
        return
    weight_map = {}
    for number, (path, names) in enumerate(written, 1):
        final = f"model-{number:05d}-of-{len(written):05d}.safetensors"
        path.rename(folder / final)
        weight_map.update(dict.fromkeys(names, final))
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")


@contextmanager
def _parameters_on_meta():
    """Build modules with their parameters on the meta device (no memory, no init) but their buffers real: the
    rotary tables are computed from the config, the weights come from the checkpoint."""
    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        if param is not None and not param.is_meta:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


@torch.no_grad()
def sliced_checkpoint(directory, shape: Shape, uniform: bool = False, dtype: torch.dtype = torch.float32,
                      trained=None):
    """The model at `shape` of the reordered checkpoint in `directory`, read tensor by tensor and only the part
    the width keeps; with `trained` (a wider width of the same weights: a TA, the sandwich's snapshot), the tensors
    it has are read from it instead, the same part of them. Peak memory is the result plus one tensor, never the
    full model (except for checkpoints that are not safetensors under the model's own names: loaded whole)."""
    try:
        source = CheckpointTensors(directory)
        top = CheckpointTensors(trained) if trained is not None else None
    except (OSError, KeyError):
        return _sliced_whole(directory, shape, uniform, dtype, trained)
    config, family, full = skeleton(directory)
    regions, state, first_name = kept_regions(full, family, shape), {}, {}
    if top is not None:
        _, trained_family, trained_model = skeleton(trained)
        trained_regions = kept_regions(trained_model, trained_family, shape)
    for name, tensor in full.state_dict(keep_vars=True).items():
        if id(tensor) in first_name:  # tied to a tensor already read (an LM head tied to the embeddings)
            state[name] = state[first_name[id(tensor)]]
            continue
        if name not in source.files:
            return _sliced_whole(directory, shape, uniform, dtype, trained)
        first_name[id(tensor)] = name
        everything = (slice(None),) * tensor.dim()
        if top is not None and name in top.files:
            sliced = top.read(name, trained_regions.get(name, everything))
        else:
            sliced = source.read(name, regions.get(name, everything))
        state[name] = sliced.to(dtype).contiguous()
    model_class, pruned = pruned_config(config, family, shape, uniform, dtype)
    return materialize(model_class, pruned, state, full)


def skeleton(directory):
    """(config, family, model with its parameters on the meta device) of a checkpoint folder."""
    from transformers import AutoModelForCausalLM

    config = load_config(directory)
    per_layer = next((m for c, m in PER_LAYER_CLASSES.values() if type(config) is c), None)
    with _parameters_on_meta(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*meta.*")
        model = per_layer(config) if per_layer else AutoModelForCausalLM.from_config(config)
    return config, family_for(config), model


def pruned_model(model, shape: Shape, uniform: bool = False, dtype: torch.dtype = torch.float32,
                 state: dict | None = None):
    """A new, smaller Hugging Face model holding `model`'s weights at `shape` (model: reordered, full),
    its weights stored in `dtype`. `state`: the weights to use instead of `model.state_dict()`."""
    family = family_for(model.config)
    if uniform and not _is_uniform(shape):
        raise ValueError("uniform export needs the same width in every layer")
    model_class, config = pruned_config(model.config, family, shape, uniform, dtype)
    return materialize(model_class, config, sliced_state_dict(model, family, shape, dtype, state), model)


def materialize(model_class, config, state: dict, buffers_from):
    """`model_class(config)` holding the tensors of `state` (no random init, no copy), with the
    non-persistent buffers (rotary inv_freq, not in state dicts) taken from the model `buffers_from`."""
    with torch.device("meta"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors")  # layers kept at 0 units
        model = model_class(config)
    model.load_state_dict(state, strict=True, assign=True)
    for name, buffer in list(model.named_buffers()):
        if buffer.is_meta:
            module_name, _, buffer_name = name.rpartition(".")
            model.get_submodule(module_name).register_buffer(
                buffer_name, buffers_from.get_buffer(name).detach().clone().float(), persistent=False)
    model.tie_weights()
    return model.eval()


def _sliced_whole(directory, shape: Shape, uniform: bool, dtype: torch.dtype, trained=None):
    """`sliced_checkpoint` with both checkpoints loaded whole in memory."""
    full = load_causal_lm(directory)
    state = full.state_dict()
    if trained is not None:  # write the trained weights into the parts of the teacher's they came from
        state = {k: v.clone() for k, v in state.items()}
        model = load_causal_lm(trained)
        family = family_for(model.config)
        regions = kept_regions(full, family_for(full.config), model_shape(model, family))
        for name, tensor in model.state_dict().items():
            state[name][regions.get(name, (slice(None),) * tensor.dim())] = tensor
    return pruned_model(full, shape, uniform, dtype, state=state)



def _check_supernet_width(model_dir: Path, permille: int, uniform: bool) -> bool | None:
    """For a run's supernet (OUT/supernet): whether the sandwich trained this width (a width it did not train is
    still a slice of trained weights, so it is written, with a warning). None for a pruned teacher."""
    path = model_dir / SUPERNET_FILE
    if not path.is_file():
        return None
    info = json.loads(path.read_text())
    if info["uniform"] != uniform:
        raise UserError(f"{model_dir} was trained with {'uniform' if info['uniform'] else 'per-layer'} widths: "
                        f"{'add' if info['uniform'] else 'drop'} --uniform to export one of them")
    trained = [parse_sparsity(s) for s in info["trained_widths"]]
    if permille not in trained:
        log.warning("the sandwich did not train sparsity %s (it trained %s); its slice of the trained weights is "
                    "written all the same", format_sparsity(permille), ", ".join(format_sparsity(s) for s in trained))
    return permille in trained


def export(model_dir, sparsity, out, *, uniform: bool = False) -> dict:
    """`minidisc export`: write the width at `sparsity` of a pruned teacher directory to `out`."""
    model_dir = Path(model_folder(str(model_dir)))
    if not model_dir.is_dir():
        raise UserError(f"model directory {model_dir} does not exist")
    plan = PruningPlan.load(model_dir)
    permille = parse_sparsity(sparsity)
    config = load_config(model_dir)
    family = family_for(config)
    shape = plan.uniform_shape(permille, family) if uniform else plan.shape(permille)
    trained = _check_supernet_width(model_dir, permille, uniform)
    tokenizer = load_tokenizer(model_dir, config)
    model = load_causal_lm(model_dir)
    plan.check_model(model, family, model_dir)
    pruned = pruned_model(model, shape, uniform, dtype=checkpoint_dtype(config))  # keep the teacher's dtype
    summary = {
        "source": public_name(model_dir), "sparsity": float(format_sparsity(permille)), "uniform": uniform,
        "attention_units": list(shape.attention), "ffn_neurons": list(shape.ffn),
        "parameters": count_parameters(model, family, shape),
        "teacher_parameters": count_parameters(model, family, plan.full_shape),
        **({} if trained is None else {"trained_in_sandwich": trained}),
    }
    with atomic_output_dir(out, kind="exported-model") as scratch:
        pruned.save_pretrained(scratch)
        tokenizer.save_pretrained(scratch)
        (scratch / "minidisc_export.json").write_text(json.dumps(summary, indent=1) + "\n")
        write_model_card(scratch, role="exported slice", source=model_source(model_dir), sparsity=summary["sparsity"],
                         shape=shape, parameters=summary["parameters"],
                         teacher_parameters=summary["teacher_parameters"], uniform=uniform,
                         query_heads_per_unit=family.query_heads_per_unit)
    log.info("exported sparsity %s (%s, %d parameters) to %s", format_sparsity(permille),
             "uniform, stock class" if uniform else "per-layer widths", summary["parameters"], out)
    return summary
