"""The model card (README.md with Hub metadata) written into every model minidisc publishes.

It says what the model is (role, sparsity, per-layer widths in short, parameters), where it came from
(the teacher by Hub id or name, its license, the TA it was distilled through, the data and the run's settings and
compute), how well it did (the run's test metrics and benchmark scores), how to load it and what to cite. No path
of the user's machine goes into it. The metadata block is huggingface_hub's `ModelCardData`, so the Hub and
`ModelCard.load` read it.
"""
from __future__ import annotations

import os
import statistics
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

from engine.core.hub import hub_id_of
from engine.core.outputs import umask_mode
from engine.core.widths import Shape

SHOWN_LAYERS = 16  # list every layer's width up to this depth; summarise deeper models


def _widths(values: tuple[int, ...]) -> str:
    if len(values) <= SHOWN_LAYERS:
        return " ".join(map(str, values))
    return (f"min {min(values)}, median {statistics.median(values):g}, max {max(values)} over {len(values)} layers "
            f"(all in config.json)")


def _fmt(value, digits: int = 4) -> str:
    return "—" if value is None else f"{value:.{digits}g}"


CITATION = """@article{zhang2022minidisc,
  title   = {MiniDisc: Minimal Distillation Schedule for Language Model Compression},
  author  = {Zhang, Chen and Yang, Yang and Wang, Qifan and Liu, Jiahao and Wang, Jingang and Wu, Wei and Song, Dawei},
  journal = {arXiv preprint arXiv:2205.14570},
  year    = {2022}
}"""


def card_text(*, role: str, source: dict, sparsity: float, shape: Shape, parameters: int, teacher_parameters: int,
              uniform: bool, via_ta: float | None = None, metrics: dict | None = None,
              benchmarks: dict | None = None, query_heads_per_unit: int = 1, training: dict | None = None) -> str:
    """The card's markdown. `source`: the teacher's public name, Hub id and license
    (`engine.core.provenance.model_source`); `metrics`: test accuracy/loss/perplexity of this model;
    `benchmarks`: {task: {metric: value}} from `minidisc eval`; `training`: the run's data sources
    [(name, weight)], settings and compute ({label: text})."""
    training = training or {}
    license = {k: source[k] for k in ("license", "license_name", "license_link") if source.get(k)}
    datasets = [hub_id_of(name) for name, _ in training.get("data", []) if hub_id_of(name)]
    data = ModelCardData(library_name="transformers", pipeline_tag="text-generation", base_model=source.get("hub_id"),
                         datasets=datasets or None, tags=["minidisc", "pruned", "knowledge-distillation",
                                                          "text-generation"], **license)
    origin = ("distilled directly from the teacher" if via_ta is None else
              f"distilled from a teacher assistant at sparsity {via_ta:g}, itself trained from the teacher")
    if role == "exported slice":
        origin = "sliced from the reordered teacher; not trained after pruning"
    rows = [("role", role), ("teacher", f"`{source.get('name', '?')}`"),
            ("sparsity", f"{sparsity:g} (each of attention units and FFN neurons: {1 - sparsity:.0%} kept)"),
            ("parameters", f"{parameters:,} ({parameters / teacher_parameters:.1%} of the teacher's "
                           f"{teacher_parameters:,})"),
            ("attention units per layer" + (f" ({query_heads_per_unit} query heads each)"
                                            if query_heads_per_unit > 1 else ""), _widths(shape.attention)),
            ("FFN neurons per layer", _widths(shape.ffn)), ("how it was made", origin),
            ("license", license.get("license_name") or license.get("license")
             or "the teacher's (its folder records none: check it before sharing this model)")]
    lines = ["---", data.to_yaml(), "---", "", f"# {role.capitalize()}: {1 - sparsity:.0%}-scale pruned model", "",
             "Made with the minidisc engine (structured pruning + knowledge distillation, teacher assistant chosen "
             "as in [MiniDisc](https://arxiv.org/abs/2205.14570)): whole attention heads (KV groups under "
             "grouped-query attention) and FFN neurons were removed in the order of their importance on the "
             "training data.", "",
             "| | |", "| --- | --- |", *(f"| {k} | {v} |" for k, v in rows), ""]
    if metrics:
        lines += ["## Quality", "", "On the run's test split, which selected nothing (next-token prediction):", "",
                  "| accuracy | loss | perplexity |", "| --- | --- | --- |",
                  f"| {_fmt(metrics.get('accuracy'))} | {_fmt(metrics.get('loss'))} | "
                  f"{_fmt(metrics.get('perplexity'))} |", ""]
    if benchmarks:
        lines += ["Benchmarks (lm-evaluation-harness):", "", "| task | metric | value |", "| --- | --- | --- |"]
        lines += [f"| {task} | {metric} | {_fmt(value)} |" for task, scores in benchmarks.items()
                  for metric, value in scores.items()]
        lines.append("")
    if training:
        data = ", ".join(f"`{name}`" + (f" (weight {weight:g})" if weight != 1 else "")
                         for name, weight in training.get("data", []))
        facts = {**training.get("settings", {}), **training.get("compute", {})}
        lines += ["## Training", "", f"Data: {data}.", "", "| the run's | |", "| --- | --- |",
                  *(f"| {k} | {v} |" for k, v in facts.items()), ""]
    remote = "" if uniform else ", trust_remote_code=True"
    lines += ["## Loading", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
              'tokenizer = AutoTokenizer.from_pretrained("PATH")',
              f'model = AutoModelForCausalLM.from_pretrained("PATH"{remote})', "```", ""]
    lines.append("A stock `LlamaForCausalLM`/`OPTForCausalLM` checkpoint: every layer keeps the same units." if uniform
                 else "Layers keep different numbers of units, so the model class ships with the checkpoint "
                      "(`modeling_minidisc.py`, torch and transformers only): pass `trust_remote_code=True`.")
    lines += ["", "## Citation", "", "```bibtex", CITATION, "```", ""]
    return "\n".join(lines) + "\n"


def write_model_card(directory, **fields) -> Path:
    """Write directory/README.md atomically (a reader never sees half a card), readable under the umask."""
    path = Path(directory) / "README.md"
    tmp = path.with_name(f".README.md.partial-{os.getpid()}")
    ModelCard(card_text(**fields)).save(tmp)
    tmp.chmod(umask_mode())
    tmp.replace(path)
    return path
