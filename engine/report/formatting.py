"""Reading a run report (candidates, models, selection) and formatting its numbers, for report.md and the plots."""
from __future__ import annotations

import math

from engine.report.report import student_label


def num(value, digits: int = 4) -> str:
    """A float with `digits` significant digits, '—' when missing (keeps tables aligned)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:.{digits}g}"


def fixed(value, decimals: int = 3) -> str:
    return "—" if value is None else f"{value:.{decimals}f}"


def count(n) -> str:
    """Parameter counts as 1.23M / 6.74B: raw counts of billion-scale models are unreadable."""
    if n is None:
        return "—"
    for size, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= size:
            return f"{n / size:.3g}{suffix}"
    return str(int(n))


def flops(n) -> str:
    """FLOP counts as 1.2e15: spans of many orders of magnitude read best in scientific notation."""
    return "—" if n is None else f"{n:.2g}"


def pct(fraction, decimals: int = 1) -> str:
    return "—" if fraction is None else f"{100 * fraction:.{decimals}f}%"


def seconds(value) -> str:
    return "—" if value is None else f"{value:.1f} s"


def is_selected(candidate: dict, selected: dict | None) -> bool:
    # Sparsities went through JSON and arithmetic, so compare with a tolerance.
    return selected is not None and math.isclose(candidate["sparsity"], selected["sparsity"], abs_tol=1e-6)


def sorted_candidates(report: dict) -> list[dict]:
    return sorted(report.get("candidates") or [], key=lambda c: c["sparsity"])


def values(candidates: list[dict], key: str) -> list[float]:
    # NaN rather than None: matplotlib leaves a gap for NaN but cannot convert None.
    return [math.nan if c.get(key) is None else c[key] for c in candidates]


def has_student_score(candidates: list[dict]) -> bool:
    return any(c.get("student_accuracy") is not None for c in candidates)


def models_of(report: dict) -> list[tuple[str, str, dict]]:
    """(label, role, metrics) of every model a report.json names, teacher first (`Report.models` on the typed
    report)."""
    models = [("teacher", "teacher", report.get("teacher")), ("TA", "ta", report.get("ta")),
              (student_label(bool(report.get("candidates"))), "student", report.get("student"))]
    models += [(m.get("label", name), "baseline", m) for name, m in (report.get("baselines") or {}).items()]
    return [(label, role, m) for label, role, m in models if m]
