"""engine.report.render: report.md and the PNG plots from synthetic run reports, and the console summary."""
from __future__ import annotations

import json

import pytest

from engine.report.render import print_summary, render

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TEACHER_PARAMS = 1_250_000
SPARSITIES = [0.5, 0.6, 0.7, 0.8, 0.9]
# Relative accuracy falls slowly, then sharply past 0.7: with lambda 0.2 the knee (0.7) wins.
P = [0.95, 0.94, 0.935, 0.80, 0.60]


def curves(widths: list[float], steps: int = 6) -> dict:
    train = [{"step": step, "width": w, "loss": 4.0 - 0.3 * step + w} for step in range(steps) for w in widths]
    evals = [{"step": step, "width": w, "accuracy": 0.2 + 0.05 * step - 0.1 * w, "loss": 3.5 - 0.2 * step + w}
             for step in range(0, steps, 2) for w in widths]
    return {"train": train, "eval": evals}


def metrics(sparsity: float, accuracy: float, loss: float, path: str) -> dict:
    return {"sparsity": sparsity, "parameters": int(TEACHER_PARAMS * (1 - 0.8 * sparsity)), "accuracy": accuracy,
            "loss": loss, "perplexity": 2.718281828 ** loss, "path": path}


def compute(steps: int, train_flops: float, wall_s: float) -> dict:
    return {"steps": steps, "tokens": steps * 1024, "width_tokens": steps * 1024, "train_flops": train_flops,
            "eval_flops": train_flops / 10, "wall_s": wall_s}


def make_report(command: str = "compress", lam: float = 0.2) -> dict:
    target = SPARSITIES[-1]
    report = {
        "format": "minidisc-report/1", "command": command, "target_sparsity": target, "lam": lam,
        "metric": "relative_accuracy",
        "teacher": {"path": "teacher", "parameters": TEACHER_PARAMS, "accuracy": 0.5, "loss": 2.0,
                    "perplexity": 7.389},
        "phases": {"prune": 1.5, "sandwich": 30.25, "ta_export": 0.75, "student": 20.0, "total": 52.5},
        "curves": {"sandwich": curves(SPARSITIES), "student": curves([target])},
    }
    student = metrics(target, 0.31, 2.9, "student") | {"relative_accuracy": 0.62, "uniform": True, "best_step": 50,
                                                       "dev_accuracy": 0.33, "compute": compute(100, 4e12, 50.25)}
    report["student"] = student
    if command == "distill":
        report["phases"] = {"student": 20.0, "total": 20.0}
        report["curves"] = {"student": curves([target])}
        return report

    candidates = []
    for i, (s, p) in enumerate(zip(SPARSITIES, P)):
        m = metrics(s, 0.5 * p, 2.0 + (1 - p), "")
        candidate = {"sparsity": s, "scale": 1 - s, "parameters": m["parameters"],
                     "parameter_fraction": m["parameters"] / TEACHER_PARAMS, "p": p, "accuracy": m["accuracy"],
                     "loss": m["loss"], "tradeoff": p + lam * s, "best_step": 10 * (i + 1)}
        if command == "maxidisc":
            candidate |= {"student_accuracy": 0.3 + 0.01 * i, "student_loss": 3.0 - 0.02 * i}
        candidates.append(candidate)
    report["candidates"] = candidates
    best = max(candidates, key=lambda c: c["p"] + lam * c["sparsity"])
    if best["sparsity"] == target:
        report["selected_ta"], report["ta"] = None, None
        report["ta_reason"] = "the trade-off peaks at the target sparsity"
    else:
        report["selected_ta"] = {"sparsity": best["sparsity"], "step": best["best_step"], "path": "ta"}
        report["ta"] = metrics(best["sparsity"], best["accuracy"], best["loss"], "ta")
        report["ta_reason"] = f"p + lambda*s peaks at s={best['sparsity']:g}"
    if command == "compress":  # --baselines ce kd-matched: without distillation, and plain KD at equal FLOPs
        report["baselines"] = {
            "ce": metrics(target, 0.25, 3.2, "baselines/ce") | {"relative_accuracy": 0.5, "label": "no distillation",
                                                                "compute": compute(50, 1e12, 12.5)},
            "kd-matched": metrics(target, 0.32, 2.8, "baselines/kd-matched") | {
                "relative_accuracy": 0.64, "label": "plain KD, equal FLOPs", "compute": compute(190, 3.99e12, 40.0)}}
        report["student_vs_baselines"] = {
            "ce": {"accuracy": 0.31 - 0.25, "relative_accuracy": 0.31 / 0.25 - 1, "loss": 3.2 - 2.9,
                   "perplexity_ratio": 2.718281828 ** 0.3},
            "kd-matched": {"accuracy": 0.31 - 0.32, "relative_accuracy": 0.31 / 0.32 - 1, "loss": 2.8 - 2.9,
                           "perplexity_ratio": 2.718281828 ** -0.1}}
        report["compute"] = {"sandwich": compute(50, 3e12, 30.25), "student": compute(50, 1e12, 20.0),
                             "baseline-ce": compute(50, 1e12, 12.5), "baseline-kd-matched": compute(190, 3.99e12, 40)}
        report["data"] = {"seq_len": 128, "train_blocks": 800, "dev_blocks": 96, "test_blocks": 64,
                          "dev": "dev.txt", "test": "held out of --data"}
        report["supernet"] = {"path": "supernet", "step": 50, "one_shot": "work/pruned", "widths": [
            {"sparsity": s, "parameters": metrics(s, 0, 0, "")["parameters"], "dev_accuracy": 0.4 - 0.1 * s,
             "dev_loss": 2.5, "trained": {"accuracy": 0.42 - 0.1 * s, "loss": 2.4},
             "one_shot": {"accuracy": 0.4 - 0.3 * s, "loss": 4.0},
             "gain": {"accuracy": 0.02 + 0.2 * s, "accuracy_interval": [0.01 + 0.2 * s, 0.03 + 0.2 * s],
                      "blocks": 64}} for s in SPARSITIES]}
    return json.loads(json.dumps(report))  # exactly what report.json holds


def assert_png(path) -> None:
    from matplotlib.image import imread

    assert path.read_bytes()[:8] == PNG_SIGNATURE
    height, width = imread(path).shape[:2]
    assert height > 100 and width > 100


def selected_row(md: str, sparsity: float) -> str:
    rows = [line for line in md.splitlines() if line.startswith("|") and "✓" in line]
    assert len(rows) == 1, rows
    assert f"**{sparsity:g}**" in rows[0]
    return rows[0]


@pytest.mark.parametrize("command", ["compress", "maxidisc"])
def test_render_with_candidates(tmp_path, command):
    report = make_report(command)
    assert report["selected_ta"]["sparsity"] == 0.7  # argmax of p + lam * s, not the target
    written = render(report, tmp_path)

    pngs = {"tradeoff.png", "models.png", "curves.png"} | ({"widths.png"} if command == "compress" else set())
    assert {p.name for p in written} == {"report.md", *pngs}
    for png in pngs:
        assert_png(tmp_path / png)

    md = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert f"# MiniDisc report: {command}" in md
    for s in SPARSITIES:
        assert f"| {s:g} |" in md or f"**{s:g}**" in md
    selected_row(md, 0.7)
    assert "no TA" not in md
    assert report["ta_reason"] in md
    assert "![" in md and "(tradeoff.png)" in md and "(curves.png)" in md
    assert "| TA |" in md and "| student (MiniDisc) |" in md and "(models.png)" in md
    if command == "compress":  # the baselines' rows with their compute, and how the student compares on test
        assert "| no distillation | 0.9 | 350K | 0.250 | 3.200 | 24.53 | — | 50 | 51.2K | 1e+12 | 1e+11 | 12.5 s |" \
            in md
        assert ("| student (MiniDisc) | 0.9 | 350K | 0.310 | 2.900 | 18.17 | 0.330 | 100 | 102K | 4e+12 | 4e+11 | "
                "50.2 s |") in md
        assert ("On test, the student is ahead of the no distillation student (given 0.25x the training FLOPs of the "
                "MiniDisc pipeline) by 6.00 accuracy points (+24.0% relative); its loss differs by -0.300.") in md
        assert ("On test, the student is behind the plain KD, equal FLOPs student (given the training FLOPs of the "
                "whole MiniDisc pipeline) by 1.00 accuracy points (-3.1% relative); its loss differs by +0.100.") in md
        assert "same budget" not in md
        assert "| baseline-kd-matched | 190 | 195K | 195K | 4e+12 | 4e+11 | 40.0 s |" in md  # compute per stage
        assert "every model figure below is measured on test (held out of --data, 64 blocks)" in md
        # every width the sandwich trained, against its one-shot prune, from OUT/supernet
        assert "`minidisc export OUT/supernet --sparsity S --out DIR`" in md and "(widths.png)" in md
        assert "| 0.7 | 550K | 0.350 | 0.190 | +16.00 [+15.00, +17.00] | 0.330 |" in md
    assert "sandwich" in md and "30.2" in md  # phases table
    assert ("student test acc. (via this TA)" in md) == (command == "maxidisc")


def test_render_no_ta_when_best_tradeoff_is_at_target(tmp_path):
    report = make_report("compress", lam=3.0)  # a large lambda favours the smallest model: the target
    assert report["selected_ta"] is None
    render(report, tmp_path)
    md = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert "No TA: the best trade-off is at the target, the student is distilled directly" in md
    assert "✓" not in md
    assert_png(tmp_path / "tradeoff.png")


def test_render_distill_has_no_tradeoff_plot(tmp_path):
    report = make_report("distill")
    written = render(report, tmp_path)
    assert {p.name for p in written} == {"report.md", "models.png", "curves.png"}  # teacher vs student
    assert not (tmp_path / "tradeoff.png").exists()
    md = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert "# MiniDisc report: distill" in md
    assert "candidates" not in md and "tradeoff.png" not in md
    assert "distilled directly" in md
    assert_png(tmp_path / "curves.png")


def test_render_minimal_report(tmp_path):
    """Only the command: no plots, no crash, still a readable markdown file."""
    written = render({"command": "distill"}, tmp_path / "nested")
    assert [p.name for p in written] == ["report.md"]
    assert "# MiniDisc report: distill" in written[0].read_text(encoding="utf-8")


@pytest.mark.parametrize("command", ["compress", "maxidisc"])
def test_print_summary_names_selected(capsys, command):
    print_summary(make_report(command))
    out = capsys.readouterr().out
    selected = [line for line in out.splitlines() if "✓" in line]
    assert len(selected) == 1 and "0.7" in selected[0]
    assert "student s=0.9" in out and "0.310" in out
    assert ("ahead of the no distillation student" in out.replace("\n", " ")) == (command == "compress")
    widths = [line for line in out.splitlines() if "+16.00 [+15.00, +17.00]" in line]  # the trained widths' table
    assert len(widths) == (command == "compress") and all("0.350" in line and "0.190" in line for line in widths)


def test_print_summary_distill(capsys):
    print_summary(make_report("distill"))
    out = capsys.readouterr().out
    assert "candidates" not in out and "student s=0.9" in out


def test_plots_say_what_they_show():
    """A loss title names its terms; a stage evaluated once per width is drawn against sparsity, not as a column of
    dots; a model's error bar is the bootstrap interval of its accuracy over the test blocks."""
    import numpy as np

    from engine.report.plots import _figure, _plot_evaluations, objective
    from engine.report.scoring import accuracy_interval

    config = {"loss": "forward_kl", "temperature": 2.0, "logit_weight": 0.5, "hidden_weight": 0.0, "ce_weight": 0.5}
    assert objective({"config": config}, "student") == "0.5·forward_kl(logits, T=2) + 0.5·CE"
    assert objective({"config": config}, "baseline-ce") == "cross-entropy on the next tokens"
    ax = _figure(4, 3).add_subplot()
    _plot_evaluations(ax, {0.0: ([10], [0.33]), 0.5: ([10], [0.27]), 0.9: ([10], [0.1])}, "sandwich")
    assert ax.get_title() == "sandwich: dev accuracy at step 10 (one evaluation)" and ax.get_xlabel() == "sparsity"
    assert list(ax.lines[0].get_xdata()) == [0.0, 0.5, 0.9]
    ax = _figure(4, 3).add_subplot()
    _plot_evaluations(ax, {0.9: ([50, 100], [0.2, 0.25])}, "student")
    assert ax.get_xlabel() == "step"

    rng = np.random.default_rng(0)
    tokens = [100] * 200
    correct = list(rng.binomial(100, 0.3, size=200))
    low, high = accuracy_interval(correct, tokens)
    mean, spread = sum(correct) / sum(tokens), 1.96 * np.std(np.asarray(correct) / 100) / np.sqrt(200)
    assert low < mean < high and (high - low) / 2 == pytest.approx(spread, rel=0.15)  # the normal approximation
    assert accuracy_interval(None, tokens) is None and accuracy_interval([1, 2], [3]) is None
