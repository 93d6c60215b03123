"""Human-readable views of a MiniDisc run report (the dict stored as OUT/report.json).

`render` writes report.md plus PNG plots (the TA trade-off, the models compared, the training curves);
`print_summary` prints the candidates and the student's metrics to the console.
"""
from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from engine.core.errors import UserError
from engine.report.formatting import (
    count,
    fixed,
    flops,
    has_student_score,
    is_selected,
    models_of,
    num,
    pct,
    seconds,
    sorted_candidates,
)
from engine.report.plots import plot_curves, plot_models, plot_tradeoff, plot_widths

NO_TA = "no TA: the best trade-off is at the target, the student is distilled directly"
# What a baseline's compute was matched to, in the words the report uses ("same budget" only where true).
MATCHED = {"kd-matched": "given the training FLOPs of the whole MiniDisc pipeline",
           "kd-steps": "given the optimiser steps of the whole MiniDisc pipeline"}

# ------------------------------------------------------------------------------------------- markdown

def _summary(report: dict) -> str:
    teacher = report.get("teacher") or {}
    student = report.get("student") or {}
    parts = []
    if teacher.get("parameters") and student.get("parameters"):
        parts.append(f"The teacher (`{teacher.get('path', '?')}`, {count(teacher['parameters'])} parameters) was "
                     f"compressed to a student of {count(student['parameters'])} parameters "
                     f"({pct(student['parameters'] / teacher['parameters'])} of the teacher).")
    settings = [f"target sparsity {num(report.get('target_sparsity'))}"]
    if report.get("lam") is not None:
        settings.append(f"λ = {report['lam']:g}")
    if report.get("metric"):
        settings.append(f"metric `{report['metric']}`")
    config = report.get("config") or {}
    if config.get("sparsest", 0) > report.get("target_sparsity", 1):
        settings.append(f"widths past the target trained up to {config['sparsest']:g}")
    if config.get("student_stage") == "joint":
        settings.append("joint student stage (the student trained with every width past the TA)")
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

    data = report.get("data")
    if data:
        parts.append(f"Dev ({data['dev']}, {data['dev_blocks']} blocks of {data['seq_len']} tokens) selected; every "
                     f"model figure below is measured on test ({data['test']}, {data['test_blocks']} blocks), which "
                     "selected nothing.")
    if student.get("accuracy") is not None:
        line = f"Student test accuracy {num(student['accuracy'])}"
        if teacher.get("accuracy") is not None:
            line += f" vs teacher {num(teacher['accuracy'])}"
        if student.get("relative_accuracy") is not None:
            line += f" (relative accuracy {num(student['relative_accuracy'])})"
        parts.append(line + ".")
    parts += regime_lines(report) + _gains(report)
    return " ".join(parts)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _candidate_table(report: dict) -> list[str]:
    candidates = sorted_candidates(report)
    with_student = has_student_score(candidates)
    header = ["TA", "sparsity", "scale", "parameters", "% of teacher", "p (dev)", "dev accuracy", "dev loss",
              "tradeoff", "best step"]
    if with_student:
        header.append("student test acc. (via this TA)")
    rows = []
    for c in candidates:
        chosen = is_selected(c, report.get("selected_ta"))
        row = ["✓" if chosen else "", f"{c['sparsity']:g}", pct(c.get("scale", 1 - c["sparsity"])),
               count(c.get("parameters")), pct(c.get("parameter_fraction")), fixed(c.get("p")),
               fixed(c.get("accuracy")), fixed(c.get("loss")), fixed(c.get("tradeoff")),
               str(c.get("best_step", "—"))]
        if with_student:
            row.append(fixed(c.get("student_accuracy")))
        if chosen:  # bold as well as ✓: the ✓ survives copy-paste into plain text
            row = [f"**{cell}**" if cell else cell for cell in row]
        rows.append(row)
    return _table(header, rows)


def _gains(report: dict) -> list[str]:
    """One sentence per baseline: how far the student is from it on test, and what the baseline's training cost
    against the whole MiniDisc pipeline's."""
    lines = []
    student_compute = (report.get("student") or {}).get("compute")
    for name, gain in (report.get("student_vs_baselines") or {}).items():
        baseline = (report.get("baselines") or {}).get(name, {})
        side = "ahead of" if gain["accuracy"] > 0 else "behind" if gain["accuracy"] < 0 else "level with"
        cost = ""
        if student_compute and baseline.get("compute"):
            ratio = baseline["compute"]["train_flops"] / student_compute["train_flops"]
            cost = f" ({MATCHED.get(name, f'given {ratio:.2g}x the training FLOPs of the MiniDisc pipeline')})"
        lines.append(f"On test, the student is {side} the {baseline.get('label', name)} student{cost} by "
                     f"{100 * abs(gain['accuracy']):.2f} accuracy points ({100 * gain['relative_accuracy']:+.1f}% "
                     f"relative{_interval(gain, '; ', '')}); its loss differs by {-gain['loss']:+.3f}.")
    return lines


def _interval(difference: dict, before: str = " (", after: str = ")") -> str:
    """' (95% interval -0.42 to +0.31 points, paired over 96 test blocks)': the paired bootstrap interval of an
    accuracy difference (first model minus second) between `before` and `after`; '' when the report has none."""
    if not difference.get("accuracy_interval"):
        return ""
    low, high = (100 * x for x in difference["accuracy_interval"])
    blocks = difference["blocks"]
    return f"{before}95% interval {low:+.2f} to {high:+.2f} points, paired over {blocks} test blocks{after}"


def regime_lines(report: dict) -> list[str]:
    """Whether the teacher knows more than the data: the first thing to read before comparing schedules."""
    regime = report.get("regime")
    if not regime:
        return []
    if not regime.get("checked"):
        return [f"Regime: not checked ({regime['why']})."]
    parts = [f"teacher - no distillation {100 * regime['teacher_minus_ce']['accuracy']:+.2f} points"
             f"{_interval(regime['teacher_minus_ce'])}"]
    if regime.get("kd_minus_ce"):
        label = ((report.get("baselines") or {}).get(regime["kd"]) or {}).get("label", regime["kd"])
        parts.append(f"{label} - no distillation {100 * regime['kd_minus_ce']['accuracy']:+.2f} points"
                     f"{_interval(regime['kd_minus_ce'])}")
    line = "Regime (test accuracy): " + "; ".join(parts) + "."
    return [line] + ([f"Warning: {regime['warning']}."] if regime.get("warning") else [])


def _comparison_table(report: dict) -> list[str]:
    rows = []
    for label, _, m in models_of(report):
        c = m.get("compute") or {}
        rows.append([label, num(m.get("sparsity", 0.0)), count(m.get("parameters")), fixed(m.get("accuracy")),
                     fixed(m.get("loss")), fixed(m.get("perplexity"), 2), fixed(m.get("dev_accuracy")),
                     str(c.get("steps", "—")), count(c.get("width_tokens")), flops(c.get("train_flops")),
                     flops(c.get("eval_flops")), seconds(c.get("wall_s"))])
    header = ["model", "sparsity", "parameters", "test accuracy", "test loss", "test perplexity", "dev accuracy",
              "steps", "tokens x widths", "training FLOPs", "evaluation FLOPs (dev selection)", "training time"]
    return _table(header, rows) if rows else []


def in_out(path: str) -> str:
    """A path of the report as a command line names it: those relative to --out under OUT/."""
    return path if Path(path).is_absolute() else f"OUT/{path}"


def supernet_intro(report: dict) -> str:
    supernet = in_out(report["supernet"]["path"])
    return (f"`{supernet}` holds the sandwich's weights at its last step ({report['supernet']['step']}): every "
            f"width it trained is a model of its own, written by `minidisc export {supernet} --sparsity S --out "
            "DIR`. On test, each width sliced from them against the same width of the pruned teacher without "
            "training (a one-shot prune); the difference is paired over the test blocks.")


def width_cells(row: dict) -> list[str]:
    """Sparsity, parameters, test accuracy trained and one-shot, and the difference with its interval."""
    gain = row.get("gain") or {}
    difference = "—" if "accuracy" not in gain else f"{100 * gain['accuracy']:+.2f}" + (
        " [{:+.2f}, {:+.2f}]".format(*(100 * x for x in gain["accuracy_interval"]))
        if gain.get("accuracy_interval") else "")
    return [f"{row['sparsity']:g}", count(row.get("parameters")), fixed((row.get("trained") or {}).get("accuracy")),
            fixed((row.get("one_shot") or {}).get("accuracy")), difference]


WIDTH_HEADER = ["sparsity", "parameters", "trained", "one-shot prune", "difference [95% interval]"]


def _widths_table(report: dict) -> list[str]:
    rows = [[*width_cells(row), fixed(row.get("dev_accuracy"))] for row in report["supernet"]["widths"]]
    return _table([*WIDTH_HEADER[:2], "test acc. trained", "test acc. one-shot prune", "difference, points [95% "
                   "interval]", "dev acc. (last evaluation)"], rows)


def _compute_table(report: dict) -> list[str]:
    stages = report.get("compute") or {}
    rows = [[name, str(c["steps"]), count(c["tokens"]), count(c["width_tokens"]), flops(c["train_flops"]),
             flops(c["eval_flops"]), seconds(c["wall_s"])] for name, c in stages.items()]
    header = ["stage", "steps", "tokens", "tokens x widths", "training FLOPs", "evaluation FLOPs", "wall time"]
    return _table(header, rows) if rows else []


def _data_table(report: dict) -> list[str]:
    sources = (report.get("data") or {}).get("sources") or []
    rows = [[f"`{_cell(s['path'])}`", fixed(s["weight"], 3), "chat" if s["chat"] else "text", count(s.get("records")),
             str(s.get("records_split", "—")), count(s["documents"]), count(s["tokens"]), seconds(s.get("tokenise_s")),
             str(s.get("duplicates_dropped", "—")), count(s["train_blocks"]), fixed(s["passes"], 2),
             str(s["truncated"]) if s["chat"] else "—", pct(s["padding"]) if s["chat"] else "—"]
            for s in sources]
    header = ["source", "weight", "kind", "records", "long records split into documents", "documents",
              "tokens", "tokenised in (when first built)", "training duplicates of dev/test dropped", "training blocks",
              "passes", "cut at --seq-len", "padding"]
    return _table(header, rows) if rows else []


def _phase_table(report: dict) -> list[str]:
    phases = report.get("phases") or {}
    if not phases:
        return []
    total = phases.get("total")
    # "total" goes last whatever order the engine recorded the phases in.
    names = [n for n in phases if n != "total"] + (["total"] if "total" in phases else [])
    rows = [[f"**{n}**" if n == "total" else n, fixed(phases[n], 1),
             pct(phases[n] / total) if total else "—"] for n in names]
    return _table(["phase", "wall time (s)", "share"], rows)


def benchmark_rows(models: dict[str, dict]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the benchmark table: one row per model (label -> metrics holding "benchmarks"),
    one column per task and metric."""
    columns = []
    for metrics in models.values():
        for task, scores in (metrics.get("benchmarks") or {}).items():
            columns += [(task, metric) for metric in scores if (task, metric) not in columns]
    rows = [[label, *(num((m["benchmarks"].get(task) or {}).get(metric)) for task, metric in columns)]
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
        lines += ["## Models", "", "Test figures; the compute columns are every stage behind a model (the MiniDisc "
                  "student's include the sandwich; the teacher's pretraining is not counted). FLOPs: 6 per weight "
                  "and token trained, 2 per teacher weight and token (Kaplan et al. 2020).", "", *comparison, ""]
        if "models" in images:
            lines += [f"![Test accuracy of every model, and against training compute]({images['models'].name})", ""]
    if (report.get("supernet") or {}).get("widths"):
        lines += ["## Trained widths", "", supernet_intro(report), "", *_widths_table(report), ""]
        if "widths" in images:
            lines += [f"![Test accuracy of every trained width and of its one-shot prune]({images['widths'].name})",
                      ""]
    compute = _compute_table(report)
    if compute:
        lines += ["## Compute per stage", "", *compute, ""]
    data = _data_table(report)
    if data:
        lines += ["## Data", "", *data, ""]
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
    for name, plot in (("tradeoff", plot_tradeoff), ("models", plot_models), ("widths", plot_widths),
                       ("curves", plot_curves)):
        path = plot(report, out_dir / f"{name}.png")
        if path is not None:
            images[name] = path
    md = out_dir / "report.md"
    md.write_text(_markdown(report, images), encoding="utf-8")
    return [md, *images.values()]


def print_summary(report: dict) -> None:
    """The candidate table (selected TA highlighted) and one line of student metrics, on stdout."""
    console = Console()
    candidates = sorted_candidates(report)
    if candidates:
        with_student = has_student_score(candidates)
        lam = report.get("lam")
        title = "MiniDisc TA candidates" + (f" (λ = {lam:g})" if lam is not None else "")
        table = Table(title=title)
        columns = ["TA", "sparsity", "params", "p (dev)", "dev acc", "dev loss", "tradeoff"]
        columns += ["student test acc"] if with_student else []
        for column in columns:
            table.add_column(column, justify="left" if column == "TA" else "right")
        for c in candidates:
            chosen = is_selected(c, report.get("selected_ta"))
            row = ["✓" if chosen else "", f"{c['sparsity']:g}", count(c.get("parameters")), fixed(c.get("p")),
                   fixed(c.get("accuracy")), fixed(c.get("loss")), fixed(c.get("tradeoff"))]
            if with_student:
                row.append(fixed(c.get("student_accuracy")))
            table.add_row(*row, style="bold green" if chosen else None)
        console.print(table)
        if report.get("selected_ta") is None:
            console.print(NO_TA)
    student = report.get("student")
    if student:
        get = student.get
        console.print(f"student s={num(get('sparsity'))}: {count(get('parameters'))} params, "
                      f"test accuracy {fixed(get('accuracy'))} (relative {fixed(get('relative_accuracy'))}), "
                      f"test loss {fixed(get('loss'))}, perplexity {fixed(get('perplexity'), 2)}")
    for line in regime_lines(report) + _gains(report):
        console.print(line, style="bold red" if line.startswith("Warning") else None)
    widths = [row for row in (report.get("supernet") or {}).get("widths") or [] if row.get("trained")]
    if widths:
        table = Table(title=f"Trained widths: test accuracy, points (export any: minidisc export "
                            f"{in_out(report['supernet']['path'])} --sparsity S --out DIR)")
        for column in WIDTH_HEADER:
            table.add_column(column, justify="right")
        for row in widths:
            table.add_row(*width_cells(row))
        console.print(table)


def rerender(out_dir) -> list[Path]:
    """`minidisc report OUT`: report.md and the plots again from OUT/report.json, and the console summary."""
    import json

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
