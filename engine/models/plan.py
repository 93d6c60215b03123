"""The pruning plan: importance order, sparsity grid and the per-layer width of every candidate.

Written as `pruning.json` next to the reordered teacher. Importance scores are stored per layer,
normalised and already in the reordered (descending) order, so a width is a prefix of every layer.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch

from engine.core.errors import UserError
from engine.core.widths import (
    DEFAULT_GRID,
    Shape,
    format_sparsity,
    keep_counts,
    parse_sparsity,
    removal_order,
    uniform_keep,
)
from engine.models.families import Family

PLAN_FILE = "pruning.json"
FORMAT = "minidisc-pruning/1"


@dataclass
class PruningPlan:
    family: str
    attention_scores: list[list[float]]  # per layer, normalised, descending (reordered)
    ffn_scores: list[list[float]]
    query_heads_per_unit: int = 1
    attention_unit: str = "kv-group"  # or "query-head" (`engine.models.families`)
    grid: tuple[int, ...] = DEFAULT_GRID  # per-mille
    ffn_multiple: int = 8
    candidates: list[dict] = field(default_factory=list)  # filled by `prune` for the report
    extra: dict = field(default_factory=dict)  # calibration details, raw scores, original orders

    @property
    def attention_sizes(self) -> list[int]:
        return [len(s) for s in self.attention_scores]

    @property
    def ffn_sizes(self) -> list[int]:
        return [len(s) for s in self.ffn_scores]

    @property
    def full_shape(self) -> Shape:
        return Shape(tuple(self.attention_sizes), tuple(self.ffn_sizes))

    @cached_property
    def _orders(self):
        to_tensors = lambda scores: [torch.tensor(s, dtype=torch.float64) for s in scores]  # noqa: E731
        return removal_order(to_tensors(self.attention_scores)), removal_order(to_tensors(self.ffn_scores))

    def shape(self, sparsity) -> Shape:
        """Per-layer width of the grid candidate at `sparsity` (a fraction, or an int per-mille)."""
        permille = sparsity if isinstance(sparsity, int) else parse_sparsity(sparsity)
        if permille not in self.grid:
            grid = ", ".join(format_sparsity(p) for p in self.grid)
            raise UserError(f"sparsity {format_sparsity(permille)} is not on the pruning grid ({grid}); "
                            "pick one of those or re-run `minidisc prune --sparsities ...`")
        attention_order, ffn_order = self._orders
        return Shape(keep_counts(attention_order, self.attention_sizes, permille),
                     keep_counts(ffn_order, self.ffn_sizes, permille, self.ffn_multiple))

    def uniform_shape(self, sparsity, family: Family) -> Shape:
        """Same units kept in every layer, snapped to what the family's stock config can describe."""
        permille = sparsity if isinstance(sparsity, int) else parse_sparsity(sparsity)
        heads = [family.stock_attention_units(uniform_keep(n, permille)) for n in self.attention_sizes]
        neurons = [uniform_keep(n, permille, self.ffn_multiple) for n in self.ffn_sizes]
        if 0 in heads or 0 in neurons:
            raise UserError(f"--uniform at sparsity {format_sparsity(permille)} keeps no units in a layer, which "
                            "stock configs cannot describe: lower the sparsity or drop --uniform")
        return Shape(tuple(heads), tuple(neurons))

    def check_model(self, model, family: Family, directory) -> None:
        """The plan must describe `model` (a pruned teacher's own weights): the units per layer it scores are the
        model's. A plan edited by hand, or copied beside another model, fails here with one line."""
        units = [(attention.num_units, ffn.num_units) for attention, ffn in family.groups(model)]
        planned = list(zip(self.attention_sizes, self.ffn_sizes))
        if len(units) != len(planned):
            what = f"{len(planned)} layers planned, {len(units)} in the model"
        else:
            what = next((f"layer {i}: (attention units, FFN neurons) {p} planned, {u} in the model"
                         for i, (p, u) in enumerate(zip(planned, units)) if p != u), "")
        if what:
            raise UserError(f"{Path(directory) / PLAN_FILE} does not match the model beside it ({what}): "
                            "re-run `minidisc prune`")

    # --- persistence ---------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "family": self.family,
            "query_heads_per_unit": self.query_heads_per_unit,
            "attention_unit": self.attention_unit,
            "grid": [format_sparsity(p) for p in self.grid],
            "ffn_multiple": self.ffn_multiple,
            "importance": {"attention": self.attention_scores, "ffn": self.ffn_scores},
            "candidates": self.candidates,
            **self.extra,
        }

    def save(self, directory: Path) -> None:
        (Path(directory) / PLAN_FILE).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, directory) -> "PruningPlan":
        path = Path(directory) / PLAN_FILE
        if not path.is_file():
            raise UserError(f"{directory} has no {PLAN_FILE}: it is not a pruned teacher; run `minidisc prune` first")
        try:
            data = json.loads(path.read_text())
            if data.get("format") != FORMAT:
                raise UserError(f"{path} has format {data.get('format')!r}, expected {FORMAT!r}")
            known = {"format", "family", "query_heads_per_unit", "attention_unit", "grid", "ffn_multiple", "importance",
                     "candidates"}
            return cls(
                family=data["family"],
                attention_scores=data["importance"]["attention"],
                ffn_scores=data["importance"]["ffn"],
                query_heads_per_unit=data["query_heads_per_unit"],
                attention_unit=data.get("attention_unit", "kv-group"),  # plans written before the option
                grid=tuple(parse_sparsity(s) for s in data["grid"]),
                ffn_multiple=data["ffn_multiple"],
                candidates=data.get("candidates", []),
                extra={k: v for k, v in data.items() if k not in known},
            )
        except (KeyError, TypeError, json.JSONDecodeError) as e:
            raise UserError(f"{path} is damaged ({type(e).__name__}: {e}); re-run `minidisc prune`") from None
