"""MiniDisc engine: structured pruning + distillation of LLaMA/OPT with one-trial TA scheduling.

Importing the package marks the per-layer-width classes for `save_pretrained`, which then copies their code
into every per-layer export and lists it in the config's `auto_map` (loaded with trust_remote_code=True).
"""
from importlib.metadata import PackageNotFoundError, version

from engine.models.modeling_minidisc import PER_LAYER_CLASSES

for _config, _model in PER_LAYER_CLASSES.values():
    _config.register_for_auto_class()
    _model.register_for_auto_class("AutoModelForCausalLM")

try:
    __version__ = version("minidisc")
except PackageNotFoundError:  # running from a source tree that was not pip-installed
    __version__ = "0.0.0+source"

from engine.config import RunConfig  # noqa: E402
from engine.errors import UserError  # noqa: E402
from engine.models.export import export, pruned_model  # noqa: E402
from engine.models.loading import load_causal_lm  # noqa: E402
from engine.models.supernet import Supernet  # noqa: E402
from engine.pruning.families import count_parameters, family_for  # noqa: E402
from engine.pruning.plan import PruningPlan  # noqa: E402
from engine.pruning.prune import prune, prune_teacher  # noqa: E402
from engine.pruning.widths import DEFAULT_GRID, Width, parse_sparsity  # noqa: E402
from engine.schedule.pipelines import compress, distill, maxidisc  # noqa: E402
from engine.tools.harness import evaluate_tasks  # noqa: E402

__all__ = ["DEFAULT_GRID", "PruningPlan", "RunConfig", "Supernet", "UserError", "Width", "compress", "count_parameters",
           "distill", "evaluate_tasks", "export", "family_for", "load_causal_lm", "maxidisc", "parse_sparsity", "prune",
           "prune_teacher", "pruned_model"]
