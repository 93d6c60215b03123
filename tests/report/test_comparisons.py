"""The report's paired comparisons: bootstrap intervals over test blocks and the regime check."""
import numpy as np
import pytest

from engine.report.report import Figures, Report
from engine.report.scoring import compared, paired_interval, regime


def blocks(seed, n=400, tokens=127):
    rng = np.random.default_rng(seed)
    difficulty = rng.uniform(0.1, 0.5, n)  # shared by both models: a paired interval cancels it
    a = rng.binomial(tokens, difficulty + 0.02)
    b = rng.binomial(tokens, difficulty)
    return a.tolist(), b.tolist(), [tokens] * n


def test_the_paired_interval_matches_the_normal_approximation():
    """Over many blocks the bootstrap's 95% interval is the ratio estimator's delta-method interval (an independent
    formula), and it is narrower than the two models' unpaired intervals would be."""
    a, b, n = (np.asarray(x, float) for x in blocks(0))
    got = paired_interval(a.tolist(), b.tolist(), n.tolist())
    diff = (a - b).sum() / n.sum()
    per_block = (a - b) - diff * n  # linearised ratio: its variance over blocks
    se = np.sqrt(len(n) * per_block.var(ddof=1)) / n.sum()
    low, high = got["accuracy_interval"]
    assert low < diff < high and got["blocks"] == 400
    assert low == pytest.approx(diff - 1.96 * se, abs=0.15 * se) and high == pytest.approx(diff + 1.96 * se,
                                                                                               abs=0.15 * se)
    unpaired = np.sqrt(sum(len(n) * ((x - x.sum() / n.sum() * n).var(ddof=1)) for x in (a, b))) / n.sum()
    assert se < 0.6 * unpaired


def test_paired_interval_edge_cases():
    a, b, n = blocks(1, n=20)
    assert paired_interval(a, a, n)["accuracy_interval"] == [0.0, 0.0]
    better = [x + 1 for x in b]  # one more correct token in every block
    low, high = paired_interval(better, b, n)["accuracy_interval"]
    assert low == high == pytest.approx(20 / sum(n))
    assert paired_interval(None, b, n) == {} and paired_interval(a[:5], b, n) == {}


def model(accuracy, correct, loss=3.0):
    return Figures(sparsity=0.9, parameters=10, accuracy=accuracy, loss=loss, perplexity=float(np.exp(loss)),
                   test_correct=correct, label="x")


def test_the_regime_check_warns_when_no_distillation_is_as_good_as_kd():
    a, b, n = blocks(2)
    acc = lambda c: sum(c) / sum(n)  # noqa: E731
    teacher, ce = model(acc(a), a), model(acc(b), b)
    good = regime(teacher, {"kd": model(acc(a), a), "ce": ce}, n)
    assert good["checked"] and good["warning"] is None and good["kd"] == "kd"
    assert good["kd_minus_ce"]["accuracy"] == pytest.approx(acc(a) - acc(b))
    assert good["kd_minus_ce"]["accuracy_interval"][0] > 0
    bad = regime(teacher, {"kd-matched": model(acc(b), b), "ce": model(acc(a), a)}, n)
    assert bad["kd"] == "kd-matched" and "distillation, with or without a TA, cannot help here" in bad["warning"]
    assert regime(teacher, {"kd": ce}, n) == {"checked": False, "why": regime(teacher, {}, n)["why"]}
    report = compared(Report(command="compress", target_sparsity=0.9, lam=0.2, metric="relative_accuracy",
                             teacher=teacher, student=model(acc(a), a), curves={}, baselines={"ce": ce},
                             test_block_tokens=n))
    assert report.student_vs_baselines["ce"]["accuracy_interval"][0] > 0 and report.regime["checked"]
