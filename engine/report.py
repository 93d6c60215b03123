"""Human-readable views of a MiniDisc run report (the dict stored as OUT/report.json).

`render` writes report.md plus PNG plots (the TA trade-off, the models compared, the training curves);
`print_summary` prints the candidates and the student's metrics to the console.
"""
from __future__ import annotations

import math
from pathlib import Path

from rich.console import Console
from rich.table import Table

DPI = 120
NO_TA = "no TA: the best trade-off is at the target, the student is distilled directly"
# Which phases produced each model, for the comparison table's wall-time column when the metric dict
# carries no time of its own (the TA comes out of the sandwich training, the student out of its own run).
ROLE_PHASES = {"ta": ("sandwich", "ta_export"), "student": ("student",)}


# ----------------------------------------------------------------------------------------- formatting

def _num(value, digits: int = 4) -> str:
    """A float with `digits` significant digits, '—' when missing (keeps tables aligned)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:.{digits}g}"


def _fixed(value, decimals: int = 3) -> str:
    return "—" if value is None else f"{value:.{decimals}f}"


def _count(n) -> str:
    """Parameter counts as 1.23M / 6.74B: raw counts of billion-scale models are unreadable."""
    if n is None:
        return "—"
    for size, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= size:
            return f"{n / size:.3g}{suffix}"
    return str(int(n))


def _pct(fraction, decimals: int = 1) -> str:
    return "—" if fraction is None else f"{100 * fraction:.{decimals}f}%"


def _seconds(value) -> str:
    return "—" if value is None else f"{value:.1f} s"


def _is_selected(candidate: dict, selected: dict | None) -> bool:
    # Sparsities went through JSON and arithmetic, so compare with a tolerance.
    return selected is not None and math.isclose(candidate["sparsity"], selected["sparsity"], abs_tol=1e-6)


def _candidates(report: dict) -> list[dict]:
    return sorted(report.get("candidates") or [], key=lambda c: c["sparsity"])


def _values(candidates: list[dict], key: str) -> list[float]:
    # NaN rather than None: matplotlib leaves a gap for NaN but cannot convert None.
    return [math.nan if c.get(key) is None else c[key] for c in candidates]


def _has_student_score(candidates: list[dict]) -> bool:
    return any(c.get("student_accuracy") is not None for c in candidates)


# ---------------------------------------------------------------------------------------------- plots

def _figure(width: float, height: float):
    """A figure drawn by Agg directly: no pyplot, so the caller's global backend and state stay untouched."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _plot_tradeoff(report: dict, path: Path) -> Path | None:
    candidates = _candidates(report)
    if not candidates:
        return None
    lam = report.get("lam")
    scale = [100 * (1 - c["sparsity"]) for c in candidates]

    fig = _figure(7.5, 4.5)
    ax = fig.add_subplot()
    ax.plot(scale, _values(candidates, "p"), "o-", color="tab:blue", label=f"p ({report.get('metric', 'score')})")
    ax.plot(scale, _values(candidates, "tradeoff"), "s-", color="tab:orange", label="trade-off p + λ·s")
    handles, labels = ax.get_legend_handles_labels()

    if _has_student_score(candidates):
        # The student score lives on its own axis: it is an absolute accuracy, not a ratio like p.
        ax2 = ax.twinx()
        ax2.plot(scale, _values(candidates, "student_accuracy"), "^--", color="tab:green",
                 label="MaxiDisc student accuracy")
        ax2.set_ylabel("student accuracy (via this TA)", color="tab:green")
        ax2.tick_params(axis="y", labelcolor="tab:green")
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2

    target = report.get("target_sparsity")
    if target is not None:
        line = ax.axvline(100 * (1 - target), color="grey", linestyle="--", linewidth=1,
                          label=f"target scale {_pct(1 - target, 0)}")
        handles.append(line)
        labels.append(line.get_label())

    selected = report.get("selected_ta")
    chosen = next((c for c in candidates if _is_selected(c, selected)), None)
    if chosen is not None and chosen.get("tradeoff") is not None:
        x, y = 100 * (1 - chosen["sparsity"]), chosen["tradeoff"]
        star = ax.plot([x], [y], "*", color="crimson", markersize=18, zorder=5, label="selected TA")[0]
        ax.annotate(f"TA s={chosen['sparsity']:g}", (x, y), xytext=(8, 10), textcoords="offset points",
                    color="crimson", fontweight="bold")
        handles.append(star)
        labels.append("selected TA")

    ax.margins(y=0.15)  # head-room so the star's annotation stays clear of the title
    ax.set_xlabel("scale = 1 − sparsity (% of prunable units kept)")
    ax.set_ylabel("p / trade-off")
    ax.grid(alpha=0.3)
    ax.set_title(f"Teacher-assistant trade-off (λ = {lam:g})" if lam is not None else "Teacher-assistant trade-off")
    ax.legend(handles, labels, loc="best", fontsize="small")
    fig.savefig(path)
    return path


def _series(points: list[dict], value: str) -> dict[float, tuple[list, list]]:
    """{width: (steps, values)} for the points that carry `value`, in step order."""
    out: dict[float, tuple[list, list]] = {}
    for point in sorted(points, key=lambda p: p["step"]):
        if point.get(value) is None:
            continue
        steps, values = out.setdefault(point.get("width", 0.0), ([], []))
        steps.append(point["step"])
        values.append(point[value])
    return dict(sorted(out.items()))


def _plot_lines(ax, series: dict, ylabel: str, title: str, marker: str | None) -> None:
    if not series:
        # Keep the grid of subplots regular but say plainly that nothing was logged.
        ax.text(0.5, 0.5, "nothing logged", ha="center", va="center", transform=ax.transAxes, color="grey")
        ax.set_axis_off()
        ax.set_title(title)
        return
    import matplotlib
    from matplotlib.ticker import MaxNLocator

    # Colour by sparsity on a sequential map, so the ordering of widths reads off the colours.
    cmap = matplotlib.colormaps["viridis"]
    widths = list(series)
    for i, width in enumerate(widths):
        steps, values = series[width]
        ax.plot(steps, values, marker=marker, markersize=3, linewidth=1.2,
                color=cmap(i / max(1, len(widths) - 1) * 0.9), label=f"s={width:g}")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # optimizer steps, never 0.5
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="x-small", ncols=2 if len(widths) > 5 else 1)


def _plot_curves(report: dict, path: Path) -> Path | None:
    stages = {name: curves for name, curves in (report.get("curves") or {}).items()
              if (curves or {}).get("train") or (curves or {}).get("eval")}
    if not stages:
        return None
    fig = _figure(11, 3.4 * len(stages))
    axes = fig.subplots(len(stages), 2, squeeze=False)
    for row, (name, curves) in zip(axes, stages.items()):
        _plot_lines(row[0], _series(curves.get("train") or [], "loss"), "training loss", f"{name}: training loss", None)
        _plot_lines(row[1], _series(curves.get("eval") or [], "accuracy"), "dev accuracy", f"{name}: dev accuracy", "o")
    fig.savefig(path)
    return path


def _plot_models(report: dict, path: Path) -> Path | None:
    """Accuracy and perplexity of teacher, TA, student and baselines side by side, parameters on the labels."""
    models = [(label, m) for label, _, m in models_of(report) if m.get("accuracy") is not None]
    if len(models) < 2:
        return None
    names = [f"{label}\n{_count(m.get('parameters'))}" for label, m in models]
    colors = ["tab:grey" if label == "teacher" else "tab:orange" if label == "TA" else
              "tab:green" if label.startswith("student") else "tab:blue" for label, _ in models]
    fig = _figure(max(6.0, 1.6 * len(models) + 2), 4.0)
    for index, (key, title) in enumerate((("accuracy", "next-token accuracy (dev)"),
                                          ("perplexity", "perplexity (dev), lower is better"))):
        ax = fig.add_subplot(1, 2, index + 1)
        values = [m.get(key) if m.get(key) is not None and math.isfinite(m[key]) else math.nan for _, m in models]
        bars = ax.bar(range(len(models)), values, color=colors)
        ax.bar_label(bars, fmt="%.3f" if key == "accuracy" else "%.1f", fontsize="small")
        ax.set_xticks(range(len(models)), names, fontsize="small")
        ax.set_title(title)
        ax.margins(y=0.15)
        ax.grid(axis="y", alpha=0.3)
    fig.savefig(path)
    return path


# ------------------------------------------------------------------------------------------- markdown

def _summary(report: dict) -> str:
    teacher = report.get("teacher") or {}
    student = report.get("student") or {}
    parts = []
    if teacher.get("parameters") and student.get("parameters"):
        parts.append(f"The teacher (`{teacher.get('path', '?')}`, {_count(teacher['parameters'])} parameters) was "
                     f"compressed to a student of {_count(student['parameters'])} parameters "
                     f"({_pct(student['parameters'] / teacher['parameters'])} of the teacher).")
    settings = [f"target sparsity {_num(report.get('target_sparsity'))}"]
    if report.get("lam") is not None:
        settings.append(f"λ = {report['lam']:g}")
    if report.get("metric"):
        settings.append(f"metric `{report['metric']}`")
    parts.append("Settings: " + ", ".join(settings) + ".")

    selected = report.get("selected_ta")
    if selected is not None:
        parts.append(f"Selected TA: sparsity {selected['sparsity']:g} (step {selected.get('step', '?')}, "
                     f"`{selected.get('path', '?')}`).")
    elif report.get("candidates"):
        parts.append(NO_TA[0].upper() + NO_TA[1:] + ".")
    else:
        parts.append("No TA search in this run: the student is distilled directly from the teacher.")
    if report.get("ta_reason"):
        reason = report["ta_reason"].rstrip()
        parts.append(f"Reason: {reason}" + ("" if reason.endswith((".", "!", "?")) else "."))

    if student.get("accuracy") is not None:
        line = f"Student accuracy {_num(student['accuracy'])}"
        if teacher.get("accuracy") is not None:
            line += f" vs teacher {_num(teacher['accuracy'])}"
        if student.get("relative_accuracy") is not None:
            line += f" (relative accuracy {_num(student['relative_accuracy'])})"
        parts.append(line + ".")
    parts += _gains(report)
    return " ".join(parts)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _candidate_table(report: dict) -> list[str]:
    candidates = _candidates(report)
    with_student = _has_student_score(candidates)
    header = ["TA", "sparsity", "scale", "parameters", "% of teacher", "p", "accuracy", "dev loss", "tradeoff",
              "best step"]
    if with_student:
        header.append("MaxiDisc student acc.")
    rows = []
    for c in candidates:
        chosen = _is_selected(c, report.get("selected_ta"))
        row = ["✓" if chosen else "", f"{c['sparsity']:g}", _pct(c.get("scale", 1 - c["sparsity"])),
               _count(c.get("parameters")), _pct(c.get("parameter_fraction")), _fixed(c.get("p")),
               _fixed(c.get("accuracy")), _fixed(c.get("loss")), _fixed(c.get("tradeoff")),
               str(c.get("best_step", "—"))]
        if with_student:
            row.append(_fixed(c.get("student_accuracy")))
        if chosen:  # bold as well as ✓: the ✓ survives copy-paste into plain text
            row = [f"**{cell}**" if cell else cell for cell in row]
        rows.append(row)
    return _table(header, rows)


def _role_time(report: dict, role: str, metrics: dict):
    if metrics.get("wall_time") is not None:
        return metrics["wall_time"]
    phases = report.get("phases") or {}
    times = [phases[name] for name in ROLE_PHASES.get(role, ()) if phases.get(name) is not None]
    return sum(times) if times else None


def models_of(report: dict) -> list[tuple[str, str, dict]]:
    """(label, role, metrics) of every model the run produced or compared, teacher first."""
    models = [("teacher", "teacher", report.get("teacher")), ("TA", "ta", report.get("ta")),
              ("student (MiniDisc)" if report.get("candidates") else "student", "student", report.get("student"))]
    models += [(m.get("label", name), "baseline", m) for name, m in (report.get("baselines") or {}).items()]
    return [(label, role, m) for label, role, m in models if m]


def _gains(report: dict) -> list[str]:
    """One sentence per baseline: how far the student is ahead of it (same size, same budget)."""
    lines = []
    for name, gain in (report.get("student_vs_baselines") or {}).items():
        label = (report.get("baselines") or {}).get(name, {}).get("label", name)
        side = "ahead of" if gain["accuracy"] > 0 else "behind" if gain["accuracy"] < 0 else "level with"
        lines.append(f"The student is {side} the {label} student (same size, same budget) by "
                     f"{100 * abs(gain['accuracy']):.2f} accuracy points ({100 * gain['relative_accuracy']:+.1f}% "
                     f"relative); its dev loss differs by {-gain['loss']:+.3f} and its perplexity is "
                     f"x{1 / gain['perplexity_ratio']:.3f} the baseline's.")
    return lines


def _comparison_table(report: dict) -> list[str]:
    models = models_of(report)
    teacher_params = (report.get("teacher") or {}).get("parameters")
    rows = []
    for label, role, m in models:
        fraction = m["parameters"] / teacher_params if m.get("parameters") and teacher_params else None
        rows.append([label, _num(m.get("sparsity", 0.0 if role == "teacher" else None)), _count(m.get("parameters")),
                     _pct(fraction), _fixed(m.get("loss")), _fixed(m.get("perplexity"), 2), _fixed(m.get("accuracy")),
                     _seconds(_role_time(report, role, m))])
    header = ["model", "sparsity", "parameters", "% of teacher", "dev loss", "perplexity", "accuracy", "wall time"]
    return _table(header, rows) if rows else []


def _phase_table(report: dict) -> list[str]:
    phases = report.get("phases") or {}
    if not phases:
        return []
    total = phases.get("total")
    # "total" goes last whatever order the engine recorded the phases in.
    names = [n for n in phases if n != "total"] + (["total"] if "total" in phases else [])
    rows = [[f"**{n}**" if n == "total" else n, _fixed(phases[n], 1),
             _pct(phases[n] / total) if total else "—"] for n in names]
    return _table(["phase", "wall time (s)", "share"], rows)


def benchmark_rows(models: dict[str, dict]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the benchmark table: one row per model (label -> metrics holding "benchmarks"),
    one column per task and metric."""
    columns = []
    for metrics in models.values():
        for task, scores in (metrics.get("benchmarks") or {}).items():
            columns += [(task, metric) for metric in scores if (task, metric) not in columns]
    rows = [[label, *(_num((m["benchmarks"].get(task) or {}).get(metric)) for task, metric in columns)]
            for label, m in models.items() if m.get("benchmarks")]
    return ["model", *(f"{task} {metric}" for task, metric in columns)], rows


def _benchmarks(report: dict) -> list[str]:
    header, rows = benchmark_rows({label: m for label, _, m in models_of(report)})
    if not rows:
        return []
    text = (report.get("benchmarks") or {}).get("text", "")
    return [f"lm-evaluation-harness scores{' on ' + text if text else ''} (acc: higher is better; perplexity "
            "and bits per byte: lower is better).", "", *_table(header, rows), ""]


def _cell(text: str) -> str:
    """Generated text inside a markdown table cell: one line, pipes escaped, an empty or blank output named."""
    return " ".join(text.split()).replace("|", "\\|") or ("(whitespace only)" if text else "(nothing: it stopped)")


def _samples(report: dict) -> list[str]:
    samples = report.get("samples")
    if not samples or not samples.get("models"):
        return []
    lines = [f"Greedy continuations ({samples['new_tokens']} new tokens) of the same prompts by every model.", ""]
    for i, prompt in enumerate(samples["prompts"]):
        lines += [f"**Prompt {i + 1}:** {_cell(prompt)}", "",
                  *_table(["model", "continuation"], [[label, _cell(texts[i])]
                                                      for label, texts in samples["models"].items()]), ""]
    return lines


def _markdown(report: dict, images: dict[str, Path]) -> str:
    lines = [f"# MiniDisc report: {report.get('command', 'run')}", "", _summary(report), ""]
    if report.get("candidates"):
        lines += ["## Teacher-assistant candidates", "", *_candidate_table(report), ""]
        if "tradeoff" in images:
            lines += [f"![TA trade-off: p and p + λ·s against scale]({images['tradeoff'].name})", ""]
    comparison = _comparison_table(report)
    if comparison:
        lines += ["## Models", "", *comparison, ""]
        if "models" in images:
            lines += [f"![Accuracy and perplexity of every model]({images['models'].name})", ""]
    benchmarks = _benchmarks(report)
    if benchmarks:
        lines += ["## Benchmarks", "", *benchmarks]
    samples = _samples(report)
    if samples:
        lines += ["## Samples", "", *samples]
    phases = _phase_table(report)
    if phases:
        lines += ["## Phases", "", *phases, ""]
    if "curves" in images:
        lines += ["## Training curves", "", f"![Training loss and dev accuracy per width]({images['curves'].name})", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ public API

def render(report: dict, out_dir) -> list[Path]:
    """Write out_dir/report.md and the plots that have data; return the written paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    images = {}
    for name, plot in (("tradeoff", _plot_tradeoff), ("models", _plot_models), ("curves", _plot_curves)):
        path = plot(report, out_dir / f"{name}.png")
        if path is not None:
            images[name] = path
    md = out_dir / "report.md"
    md.write_text(_markdown(report, images), encoding="utf-8")
    return [md, *images.values()]


def print_summary(report: dict) -> None:
    """The candidate table (selected TA highlighted) and one line of student metrics, on stdout."""
    console = Console()
    candidates = _candidates(report)
    if candidates:
        with_student = _has_student_score(candidates)
        lam = report.get("lam")
        title = "MiniDisc TA candidates" + (f" (λ = {lam:g})" if lam is not None else "")
        table = Table(title=title)
        columns = ["TA", "sparsity", "params", "p", "acc", "loss", "tradeoff"]
        columns += ["student acc"] if with_student else []
        for column in columns:
            table.add_column(column, justify="left" if column == "TA" else "right")
        for c in candidates:
            chosen = _is_selected(c, report.get("selected_ta"))
            row = ["✓" if chosen else "", f"{c['sparsity']:g}", _count(c.get("parameters")), _fixed(c.get("p")),
                   _fixed(c.get("accuracy")), _fixed(c.get("loss")), _fixed(c.get("tradeoff"))]
            if with_student:
                row.append(_fixed(c.get("student_accuracy")))
            table.add_row(*row, style="bold green" if chosen else None)
        console.print(table)
        if report.get("selected_ta") is None:
            console.print(NO_TA)
    student = report.get("student")
    if student:
        get = student.get
        console.print(f"student s={_num(get('sparsity'))}: {_count(get('parameters'))} params, "
                      f"accuracy {_fixed(get('accuracy'))} (relative {_fixed(get('relative_accuracy'))}), "
                      f"dev loss {_fixed(get('loss'))}, perplexity {_fixed(get('perplexity'), 2)}")
    for line in _gains(report):
        console.print(line)


def rerender(out_dir) -> list[Path]:
    """`minidisc report OUT`: report.md and the plots again from OUT/report.json, and the console summary."""
    import json

    from .errors import UserError

    path = Path(out_dir) / "report.json"
    if not path.is_file():
        partial = "; the run has not finished (continue it with --resume)" if (Path(out_dir) / "run.json").is_file() \
            else ""
        raise UserError(f"{path} does not exist: give the output directory of a finished minidisc run{partial}")
    try:
        report = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON: {e}") from None
    written = render(report, out_dir)
    print_summary(report)
    Console().print("wrote " + ", ".join(str(p) for p in written))
    return written
