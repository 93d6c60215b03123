"""MiniDisc engine: structured pruning + distillation of LLaMA/OPT with one-trial TA scheduling.

Importing the package registers the per-layer-width model classes with transformers' Auto classes.
"""
from importlib.metadata import PackageNotFoundError, version

from transformers import AutoConfig, AutoModelForCausalLM

from .modeling_minidisc import MiniDiscLlamaConfig, MiniDiscLlamaForCausalLM, MiniDiscOPTConfig, MiniDiscOPTForCausalLM

for _config, _model in ((MiniDiscLlamaConfig, MiniDiscLlamaForCausalLM), (MiniDiscOPTConfig, MiniDiscOPTForCausalLM)):
    AutoConfig.register(_config.model_type, _config, exist_ok=True)
    AutoModelForCausalLM.register(_config, _model, exist_ok=True)
    # save_pretrained then copies modeling_minidisc.py next to the weights (trust_remote_code loading).
    _config.register_for_auto_class()
    _model.register_for_auto_class("AutoModelForCausalLM")

try:
    __version__ = version("minidisc")
except PackageNotFoundError:  # running from a source tree that was not pip-installed
    __version__ = "0.0.0+source"

from .compress import compress, distill, maxidisc  # noqa: E402
from .config import RunConfig  # noqa: E402
from .errors import UserError  # noqa: E402
from .export import export, pruned_model  # noqa: E402
from .families import count_parameters, family_for  # noqa: E402
from .grid import DEFAULT_GRID, Width, parse_sparsity  # noqa: E402
from .plan import PruningPlan  # noqa: E402
from .prune import prune, prune_teacher  # noqa: E402
from .supernet import Supernet  # noqa: E402

__all__ = ["DEFAULT_GRID", "PruningPlan", "RunConfig", "Supernet", "UserError", "Width", "compress", "count_parameters",
           "distill", "export", "family_for", "maxidisc", "parse_sparsity", "prune", "prune_teacher", "pruned_model"]
