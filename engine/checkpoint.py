"""Loading Hugging Face checkpoints from local directories, and writing output directories atomically.

An output directory is built under a hidden `.NAME.partial-PID` sibling and renamed into place only when
complete, so a killed job never leaves a directory that looks finished. A marker file says it is ours:
we replace our own outputs, but never a directory someone else wrote.
"""
from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch

from .errors import UserError
from .families import family_for
from .modeling_minidisc import PER_LAYER_CLASSES

MARKER = ".minidisc"


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


def is_ours(directory: Path) -> bool:
    return (directory / MARKER).is_file()


def umask_mode(is_dir: bool = False) -> int:
    """The mode a new file (0644 under umask 022) or folder gets from the user's umask."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if is_dir else 0o666) & ~umask


def _apply_umask(directory: Path) -> None:
    """Give every file the mode the user's umask asks for. safetensors writes 0600 whatever the umask, and copies
    keep that mode: a teammate or a serving account could not read the model."""
    for path in directory.rglob("*"):
        path.chmod(umask_mode(path.is_dir()))


@contextmanager
def atomic_output_dir(out, kind: str):
    """Yield a scratch directory; on success it replaces `out` in one rename, on failure it is removed."""
    out = Path(out)
    if out.exists() and not (out.is_dir() and (is_ours(out) or not any(out.iterdir()))):
        raise UserError(f"output {out} exists and was not written by minidisc: choose a new --out or remove it")
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    try:
        yield scratch
        (scratch / MARKER).write_text(json.dumps({"kind": kind}) + "\n")
        _apply_umask(scratch)
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
            scratch.rename(out)
            shutil.rmtree(old)
        else:
            scratch.rename(out)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
