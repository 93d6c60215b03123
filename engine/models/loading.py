"""Loading Hugging Face checkpoints (config, weights, tokenizer) from local directories, with one-line errors."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from engine.errors import UserError
from engine.models.modeling_minidisc import PER_LAYER_CLASSES
from engine.pruning.families import family_for


def _check_model_dir(directory: Path) -> None:
    if not directory.is_dir():
        raise UserError(f"model directory {directory} does not exist")
    if not (directory / "config.json").is_file():
        raise UserError(f"{directory} has no config.json: point to a Hugging Face checkpoint directory "
                        "(the folder written by save_pretrained)")


def load_config(directory):
    """The checkpoint's config: a per-layer MiniDisc config when its architectures name one, else AutoConfig's."""
    from transformers import AutoConfig

    directory = Path(directory)
    _check_model_dir(directory)
    try:
        architectures = json.loads((directory / "config.json").read_text()).get("architectures") or [None]
        config_class = PER_LAYER_CLASSES.get(architectures[0], (AutoConfig,))[0]
        config = config_class.from_pretrained(directory)
    except (ValueError, KeyError, OSError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot read {directory}/config.json: {first_line}") from None
    family_for(config)  # unsupported families fail here, before any weights are read
    return config


def check_seq_len(config, seq_len: int, whose: str = "model's", flag: str = "--seq-len") -> None:
    """Blocks of `seq_len` tokens must fit the model's positions."""
    max_len = getattr(config, "max_position_embeddings", None)
    if max_len is not None and seq_len > max_len:
        raise UserError(f"{flag} {seq_len} exceeds the {whose} max_position_embeddings ({max_len})")


def is_per_layer(config) -> bool:
    """Whether a config describes a MiniDisc per-layer-width export (its architectures name our class)."""
    architecture = (getattr(config, "architectures", None) or [None])[0]
    return architecture in PER_LAYER_CLASSES or config.model_type.startswith("minidisc_")  # (older exports)


def checkpoint_dtype(config) -> torch.dtype:
    """The floating dtype a checkpoint declares (float32 when it declares none). We compute in fp32 and
    write outputs back in this dtype, so a bf16 teacher does not come back twice its size."""
    dtype = getattr(config, "dtype", None)
    dtype = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32


def load_causal_lm(directory, dtype=torch.float32, **kwargs):
    """A supported causal LM from a local checkpoint directory (fp32 by default), per-layer exports included."""
    from transformers import AutoModelForCausalLM

    directory = Path(directory)
    config = load_config(directory)
    if not any(directory.glob("*.safetensors")) and not any(directory.glob("*.bin")):
        raise UserError(f"{directory} has a config.json but no weights (*.safetensors or *.bin)")
    try:
        model_class = next((m for c, m in PER_LAYER_CLASSES.values() if type(config) is c), AutoModelForCausalLM)
        return model_class.from_pretrained(directory, config=config, dtype=dtype, **kwargs)
    except OSError as e:
        raise UserError(f"cannot load the weights in {directory}: {str(e).strip().splitlines()[0]}") from None


def load_tokenizer(directory, config=None):
    """The tokenizer saved in a model directory, checked against the model's vocabulary."""
    from transformers import AutoTokenizer

    directory = Path(directory)
    names = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")
    if not any((directory / name).is_file() for name in names):
        raise UserError(f"no tokenizer in {directory}: save one there with tokenizer.save_pretrained('{directory}')")
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory)
    except (ValueError, OSError) as e:
        raise UserError(f"cannot load the tokenizer in {directory}: {str(e).strip().splitlines()[0]}") from None
    if config is not None and len(tokenizer) > config.vocab_size:
        raise UserError(f"the tokenizer in {directory} has {len(tokenizer)} tokens but the model's vocab_size is "
                        f"{config.vocab_size}: they do not belong together")
    return tokenizer
