"""The report's plots (matplotlib, Agg): the trade-off per candidate, training and dev curves, the models compared."""
from __future__ import annotations

from pathlib import Path

from engine.report.formatting import count, has_student_score, is_selected, models_of, pct, sorted_candidates, values

DPI = 120


def _figure(width: float, height: float):
    """A figure drawn by Agg directly: no pyplot, so the caller's global backend and state stay untouched."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def plot_tradeoff(report: dict, path: Path) -> Path | None:
    candidates = sorted_candidates(report)
    if not candidates:
        return None
    lam = report.get("lam")
    scale = [100 * (1 - c["sparsity"]) for c in candidates]

    fig = _figure(7.5, 4.5)
    ax = fig.add_subplot()
    ax.plot(scale, values(candidates, "p"), "o-", color="tab:blue", label=f"p ({report.get('metric', 'score')})")
    ax.plot(scale, values(candidates, "tradeoff"), "s-", color="tab:orange", label="trade-off p + λ·s")
    handles, labels = ax.get_legend_handles_labels()

    if has_student_score(candidates):
        # The student score lives on its own axis: it is an absolute accuracy, not a ratio like p.
        ax2 = ax.twinx()
        ax2.plot(scale, values(candidates, "student_accuracy"), "^--", color="tab:green",
                 label="MaxiDisc student accuracy")
        ax2.set_ylabel("student accuracy (via this TA)", color="tab:green")
        ax2.tick_params(axis="y", labelcolor="tab:green")
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2

    target = report.get("target_sparsity")
    if target is not None:
        line = ax.axvline(100 * (1 - target), color="grey", linestyle="--", linewidth=1,
                          label=f"target scale {pct(1 - target, 0)}")
        handles.append(line)
        labels.append(line.get_label())

    selected = report.get("selected_ta")
    chosen = next((c for c in candidates if is_selected(c, selected)), None)
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


def objective(report: dict, stage: str) -> str:
    """What a stage's training loss is made of, from the run's options (the no-distillation baseline: CE alone)."""
    config = report.get("config") or {}
    if stage == "baseline-ce":
        return "cross-entropy on the next tokens"
    terms = [(config.get("logit_weight"), f"{config.get('loss', 'KL')}(logits, T={config.get('temperature', 1):g})"),
             (config.get("hidden_weight"), "hidden-state MSE"), (config.get("ce_weight"), "CE")]
    shown = [f"{weight:g}·{name}" for weight, name in terms if weight]
    return " + ".join(shown) if shown else "loss"


def _plot_evaluations(ax, series: dict, stage: str) -> None:
    """Dev accuracy per width: curves over the steps, or, when each width was evaluated once (a short stage, or
    --eval-every past its steps), one point per width against its sparsity, which is what that evaluation says."""
    if series and all(len(steps) == 1 for steps, _ in series.values()):
        widths = list(series)
        step = series[widths[0]][0][0]
        ax.plot(widths, [series[w][1][0] for w in widths], "o-", color="tab:blue")
        ax.set_xlabel("sparsity")
        ax.set_ylabel("dev accuracy")
        ax.set_title(f"{stage}: dev accuracy at step {step} (one evaluation)")
        ax.grid(alpha=0.3)
        return
    _plot_lines(ax, series, "dev accuracy", f"{stage}: dev accuracy", "o")


def plot_curves(report: dict, path: Path) -> Path | None:
    stages = {name: curves for name, curves in (report.get("curves") or {}).items()
              if (curves or {}).get("train") or (curves or {}).get("eval")}
    if not stages:
        return None
    fig = _figure(11, 3.4 * len(stages))
    axes = fig.subplots(len(stages), 2, squeeze=False)
    for row, (name, curves) in zip(axes, stages.items()):
        _plot_lines(row[0], _series(curves.get("train") or [], "loss"), "training loss",
                    f"{name}: training loss = {objective(report, name)}", None)
        _plot_evaluations(row[1], _series(curves.get("eval") or [], "accuracy"), name)
    fig.savefig(path)
    return path


MARKERS = "oD^vsPX*ph<>"


def plot_models(report: dict, path: Path) -> Path | None:
    """Test accuracy of teacher, TA, student and baselines side by side (parameters on the labels), each with its
    95% bootstrap interval over the test blocks, and of the trained ones against their training FLOPs."""
    from engine.report.scoring import accuracy_interval

    models = [(label, m) for label, _, m in models_of(report) if m.get("accuracy") is not None]
    if len(models) < 2:
        return None
    names = ["\n".join([*label.split(", "), count(m.get("parameters"))]) for label, m in models]
    colors = [_color(label) for label, _ in models]
    fig = _figure(max(10.0, 1.6 * len(models) + 6), 4.6)
    bars_ax, cost_ax = fig.subplots(1, 2)
    accuracy = [m["accuracy"] for _, m in models]
    intervals = [accuracy_interval(m.get("test_correct"), report.get("test_block_tokens")) for _, m in models]
    errors = [[a - i[0] if i else 0 for a, i in zip(accuracy, intervals)],
              [i[1] - a if i else 0 for a, i in zip(accuracy, intervals)]]
    bars = bars_ax.bar(range(len(models)), accuracy, color=colors, yerr=errors if any(intervals) else None,
                       capsize=4, ecolor="black")
    bars_ax.bar_label(bars, fmt="%.3f", fontsize="small", padding=8)
    bars_ax.set_xticks(range(len(models)), names, fontsize="small")
    bars_ax.set_title("next-token accuracy (test)" + (", 95% interval over blocks" if any(intervals) else ""))
    bars_ax.margins(y=0.15)
    bars_ax.grid(axis="y", alpha=0.3)
    for i, (label, m) in enumerate(models):
        if (m.get("compute") or {}).get("train_flops"):
            cost_ax.plot(m["compute"]["train_flops"], m["accuracy"], MARKERS[i % len(MARKERS)],
                         color=_color(label), markersize=8, label=label)
        elif label == "teacher":
            cost_ax.axhline(m["accuracy"], color=_color(label), linestyle="--", linewidth=1, label="teacher")
    cost_ax.legend(loc="best", fontsize="small")  # names in a legend: annotations overflow the panel
    cost_ax.set_xscale("log")
    cost_ax.set_xlabel("training FLOPs (every stage behind the model)")
    cost_ax.set_ylabel("test accuracy")
    cost_ax.set_title("quality against compute")
    cost_ax.margins(x=0.2, y=0.15)
    cost_ax.grid(alpha=0.3)
    fig.savefig(path)
    return path


def plot_widths(report: dict, path: Path) -> Path | None:
    """Test accuracy of every width the sandwich trained against its size, beside the same widths pruned without
    training, with the teacher, TA and student marked: what one sandwich run gives besides the TA."""
    rows = [row for row in (report.get("supernet") or {}).get("widths") or [] if row.get("trained")]
    teacher = (report.get("teacher") or {}).get("parameters")
    if len(rows) < 2 or not teacher:
        return None
    size = [100 * row["parameters"] / teacher for row in rows]
    fig = _figure(7.5, 4.5)
    ax = fig.add_subplot()
    ax.plot(size, [row["trained"]["accuracy"] for row in rows], "o-", color="tab:green",
            label="trained in the sandwich (OUT/supernet)")
    ax.plot(size, [row["one_shot"]["accuracy"] for row in rows], "s--", color="tab:grey", label="one-shot prune")
    for label, role, m in models_of(report):
        if role != "baseline" and m.get("accuracy") is not None and m.get("parameters"):
            ax.plot(100 * m["parameters"] / teacher, m["accuracy"], "*", markersize=12, color=_color(label),
                    label=label)
    ax.set_xlabel("parameters (% of the teacher)")
    ax.set_ylabel("next-token accuracy (test)")
    ax.set_title("Every trained width, from one sandwich run")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    fig.savefig(path)
    return path


def _color(label: str) -> str:
    return ("tab:grey" if label == "teacher" else "tab:orange" if label == "TA" else
            "tab:green" if label.startswith("student") else "tab:blue")
