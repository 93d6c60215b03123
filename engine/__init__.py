"""MiniDisc engine: structured pruning + distillation of LLaMA, Mistral, Qwen and OPT models with one-trial TA
scheduling.

The public API below is imported on first use, so `import engine` (and `minidisc --help`) does not load
torch, transformers and DeepSpeed until something needs them.
"""
from importlib import import_module
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("minidisc")
except PackageNotFoundError:  # running from a source tree that was not pip-installed
    __version__ = "0.0.0+source"

_API = {  # name -> the module that defines it
    "RunConfig": "engine.config", "UserError": "engine.core.errors", "export": "engine.models.export",
    "pruned_model": "engine.models.export", "load_causal_lm": "engine.models.loading",
    "Supernet": "engine.models.supernet", "count_parameters": "engine.models.families",
    "family_for": "engine.models.families", "PruningPlan": "engine.models.plan", "prune": "engine.pruning.prune",
    "prune_teacher": "engine.pruning.prune", "DEFAULT_GRID": "engine.core.widths", "Shape": "engine.core.widths",
    "parse_sparsity": "engine.core.widths", "compress": "engine.schedule.pipelines",
    "distill": "engine.schedule.pipelines", "maxidisc": "engine.schedule.pipelines",
    "evaluate_tasks": "engine.report.harness",
}
__all__ = sorted(_API)


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'engine' has no attribute {name!r}")
    value = getattr(import_module(_API[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])
