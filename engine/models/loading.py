"""Loading Hugging Face checkpoints (config, weights, tokenizer) from local directories, with one-line errors."""
from __future__ import annotations

import gc
import json
from pathlib import Path

import torch

from engine.core.errors import UserError
from engine.models.families import family_for
from engine.models.modeling_minidisc import PER_LAYER_CLASSES
from engine.models.plan import PLAN_FILE, PruningPlan


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


def check_weights(directory) -> None:
    """The checkpoint's weight files are all there and readable: each safetensors header is parsed (it must cover
    its file: a truncated download fails here) and each shard the index names exists. Cheap (no tensor is read),
    so commands call it before writing any output."""
    from safetensors import safe_open

    directory = Path(directory)
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (ValueError, KeyError, TypeError, AttributeError):
            raise UserError(f"{index} is not a safetensors index (JSON with a weight_map): save the model again") \
                from None
        missing = sorted(shard for shard in shards if not (directory / shard).is_file())
        if missing:
            raise UserError(f"{directory} lacks {', '.join(missing)}, named in {index.name}: copy every shard")
    for path in sorted(directory.glob("*.safetensors")):
        try:
            with safe_open(path, "pt"):
                pass
        except Exception as e:  # safetensors' SafetensorError has no stable import path
            raise UserError(f"{path} is damaged ({str(e).strip().splitlines()[0]}): copy or save it again") \
                from None


def check_checkpoint(directory, seq_len: int, whose: str = "model's", flag: str = "--seq-len"):
    """What is cheap to check in a checkpoint, before any output is written: its config (a supported family),
    weight files, tokenizer and (in a pruned teacher) pruning plan against its shapes, and blocks of `seq_len`
    tokens within its positions. Returns (config, tokenizer)."""
    config = load_config(directory)
    check_weights(directory)
    tokenizer = load_tokenizer(directory, config)
    check_seq_len(config, seq_len, whose, flag)
    if (Path(directory) / PLAN_FILE).is_file():
        PruningPlan.load(directory).check_model(meta_model(config), family_for(config), directory)
    return config, tokenizer


def meta_model(config):
    """The architecture of `config` on the meta device (no memory): for shapes, parameter and FLOP counts."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    model.tie_weights()  # transformers 5.0 leaves tied embeddings untied on the meta device
    return model


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
    check_weights(directory)
    try:
        model_class = next((m for c, m in PER_LAYER_CLASSES.values() if type(config) is c), AutoModelForCausalLM)
        model = model_class.from_pretrained(directory, config=config, dtype=dtype, **kwargs)
    except OSError as e:
        raise UserError(f"cannot load the weights in {directory}: {str(e).strip().splitlines()[0]}") from None
    # Under ZeRO-3's zero.Init a tied output layer is built and partitioned before transformers ties it to the
    # embedding; the orphan ([vocab, hidden]: a quarter of a 0.5B model) lives in a reference cycle through the
    # methods DeepSpeed binds on it, so only a full collection frees it.
    gc.collect()
    return model


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
    # Another model's tokenizer that happens to fit (LLaMA-2's in a LLaMA-3 folder) starts sequences with another
    # token. Only BOS is compared: fine-tunes legitimately change EOS (LLaMA-3-Instruct's <|eot_id|>).
    bos = getattr(config, "bos_token_id", None)
    if isinstance(bos, int) and tokenizer.bos_token_id is not None and tokenizer.bos_token_id != bos:
        raise UserError(f"the tokenizer in {directory} starts sequences with token {tokenizer.bos_token_id} "
                        f"({tokenizer.bos_token}) but the model's bos_token_id is {bos}: they do not belong together; "
                        "save the model's own tokenizer there")
    return tokenizer
