"""MiniDisc engine: structured pruning + distillation of LLaMA/OPT with one-trial TA scheduling.

Importing the package marks the per-layer-width classes for `save_pretrained`, which then copies their code
into every per-layer export and lists it in the config's `auto_map` (loaded with trust_remote_code=True).
"""
from importlib.metadata import PackageNotFoundError, version

from .modeling_minidisc import PER_LAYER_CLASSES

for _config, _model in PER_LAYER_CLASSES.values():
    _config.register_for_auto_class()
    _model.register_for_auto_class("AutoModelForCausalLM")

try:
    __version__ = version("minidisc")
except PackageNotFoundError:  # running from a source tree that was not pip-installed
    __version__ = "0.0.0+source"

from .checkpoint import load_causal_lm  # noqa: E402
from .compress import compress, distill, maxidisc  # noqa: E402
from .config import RunConfig  # noqa: E402
from .errors import UserError  # noqa: E402
from .export import export, pruned_model  # noqa: E402
from .families import count_parameters, family_for  # noqa: E402
from .harness import evaluate_tasks  # noqa: E402
from .grid import DEFAULT_GRID, Width, parse_sparsity  # noqa: E402
from .plan import PruningPlan  # noqa: E402
from .prune import prune, prune_teacher  # noqa: E402
from .supernet import Supernet  # noqa: E402

__all__ = ["DEFAULT_GRID", "PruningPlan", "RunConfig", "Supernet", "UserError", "Width", "compress", "count_parameters",
           "distill", "evaluate_tasks", "export", "family_for", "load_causal_lm", "maxidisc", "parse_sparsity", "prune",
           "prune_teacher", "pruned_model"]
