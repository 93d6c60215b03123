"""Sandwich training of all widths, one-pass evaluation, the lambda-tradeoff choice and the objective."""
import copy

import pytest
import torch
from helpers import tiny_model

import engine
import kernels
from engine.distillation.evaluation import evaluate_widths
from engine.distillation.loss import Objective, hidden_layer_indices, stacked_width_loss, teacher_outputs, width_loss
from engine.distillation.selection import choose_ta, tradeoff


@pytest.fixture(params=["llama_gqa", "opt"])
def setup(request):
    teacher = tiny_model(request.param)
    calibration = torch.randint(3, 300, (4, 12), generator=torch.Generator().manual_seed(1))
    plan = engine.prune_teacher(teacher, None, calibration, grid=(0, 300, 500, 700, 900), batch_size=2)
    torch.manual_seed(0)
    supernet = engine.Supernet(copy.deepcopy(teacher), plan)
    with torch.no_grad():  # the supernet drifts from the teacher as in training, so losses are not zero
        for p in supernet.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ids = torch.randint(3, 300, (2, 10), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # padding at the end of the second sequence
    return teacher, supernet, ids, mask


def test_objective_terms_match_their_definitions(setup):
    teacher, supernet, ids, mask = setup
    supernet.set_sparsity(500)
    objective = Objective(kind="forward_kl", temperature=2.0, hidden_weight=0.5, ce_weight=0.3)
    losses = width_loss(supernet.model, teacher_outputs(teacher, ids), ids, mask, objective)
    s_out = supernet.model.model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    t_out = teacher.model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    next_keep = (mask[:, :-1] * mask[:, 1:]).bool()
    logit = kernels.distill_loss(supernet.model.lm_head(s_out.last_hidden_state)[:, :-1],
                                 teacher.lm_head(t_out.last_hidden_state)[:, :-1], temperature=2.0, mask=next_keep)
    layers = hidden_layer_indices(len(s_out.hidden_states) - 1)
    assert layers[0] == 0 and layers[-1] == len(s_out.hidden_states) - 1
    keep = mask.bool()
    hidden = sum(((s_out.hidden_states[i] - t_out.hidden_states[i]) ** 2).mean(-1)[keep].mean() for i in layers)
    hidden = hidden / len(layers)
    labels = ids[:, 1:].masked_fill(~next_keep, -100)
    ce = torch.nn.functional.cross_entropy(supernet(input_ids=ids).logits[:, :-1].flatten(0, 1), labels.flatten(),
                                           ignore_index=-100)
    torch.testing.assert_close(losses["logit"], logit.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses["hidden"], hidden.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses["ce"], ce.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses["loss"].detach(), 0.5 * logit + 0.5 * hidden + 0.3 * ce, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("per_forward,checkpointed", [(1, False), (0, False), (2, False), (0, True)])
def test_stacked_widths_give_the_mean_of_per_width_gradients(setup, per_forward, checkpointed):
    """Every way `train_step` runs a step's widths (one after another; all stacked in one forward, also with each
    layer recomputed in the backward; two, then one), each forward's loss weighted by its share of the K widths,
    gives the mean of the widths' gradients, each computed alone, and each width's own loss terms."""
    from engine.training.engines import checkpoint_layers

    teacher, supernet, ids, mask = setup
    if checkpointed:
        checkpoint_layers(supernet.model)
    widths, objective = [500, 700, 900], Objective(hidden_weight=0.5, ce_weight=0.3)
    t_out = teacher_outputs(teacher, ids)
    supernet.zero_grad()
    size, metrics = per_forward or len(widths), {}
    for start in range(0, len(widths), size):
        group = widths[start:start + size]
        supernet.stack([supernet.plan.shape(s) for s in group])
        loss, parts = stacked_width_loss(supernet.model, t_out, ids, mask, objective, len(group))
        (loss * len(group) / len(widths)).backward()
        metrics.update({s: {name: value[i] for name, value in parts.items()} for i, s in enumerate(group)})
    stacked = {n: p.grad.clone() for n, p in supernet.named_parameters()}
    expected = {n: torch.zeros_like(p) for n, p in supernet.named_parameters()}
    for permille in widths:  # each width alone, separately
        supernet.zero_grad()
        supernet.set_sparsity(permille)
        losses = width_loss(supernet.model, t_out, ids, mask, objective)
        losses["loss"].backward()
        for n, p in supernet.named_parameters():
            expected[n] += p.grad / len(widths)
        for part, value in losses.items():
            torch.testing.assert_close(metrics[permille][part], value.detach(), rtol=1e-5, atol=1e-6)
    assert any(g.abs().sum() > 0 for g in stacked.values())
    for n in stacked:
        torch.testing.assert_close(stacked[n], expected[n], rtol=1e-5, atol=1e-7, msg=n)


def test_stacked_widths_need_one_gather_per_layer(setup):
    """Stacked, each decoder layer is called once per forward for all widths (ZeRO-3 gathers a layer per call), in
    training and in the evaluation, and the widths really differ: each copy of the batch gets its own width's
    hidden states."""
    teacher, supernet, ids, mask = setup
    layers = supernet.family.layers(supernet.model)
    calls = []
    hooks = [layer.register_forward_pre_hook(lambda m, a, i=i: calls.append(i)) for i, layer in enumerate(layers)]
    supernet.stack([supernet.plan.shape(s) for s in (0, 500, 900)])
    stacked = supernet.model.model(input_ids=ids.repeat(3, 1), use_cache=False).last_hidden_state
    assert calls == list(range(len(layers)))
    evaluate_widths(supernet, teacher, [(ids, mask)], [0, 500, 900])
    assert calls == 2 * list(range(len(layers)))
    for hook in hooks:
        hook.remove()
    with pytest.raises(ValueError, match="3 stacked widths need a batch of 3 equal parts, got 2 rows"):
        supernet.model.model(input_ids=ids, use_cache=False)  # the batch not repeated
    for k, permille in enumerate((0, 500, 900)):
        supernet.set_sparsity(permille)
        alone = supernet.model.model(input_ids=ids).last_hidden_state
        torch.testing.assert_close(stacked[k * len(ids):(k + 1) * len(ids)], alone, rtol=1e-5, atol=1e-6)


def test_one_pass_evaluation_equals_each_width_alone(setup):
    """The widths evaluated stacked in one forward per batch score exactly what each scores alone."""
    teacher, supernet, ids, mask = setup
    batches = [(ids, mask), (ids.flip(0), mask.flip(0))]
    together = evaluate_widths(supernet, teacher, batches, [0, 500, 900])
    for permille in (0, 500, 900):
        alone = evaluate_widths(supernet, teacher, batches, [permille])
        assert together[permille] == alone[permille]
    assert together["teacher"]["tokens"] == 2 * (9 + 6)
    assert together[900]["loss"] != together[0]["loss"]  # the widths really switched


def full_logits_stats(model, ids, mask):
    """Accuracy and mean CE over non-padding next tokens from the model's [B, T, V] logits (the plain way)."""
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].double()
    keep = (mask[:, :-1] & mask[:, 1:]).bool()
    correct = (logits.argmax(-1) == ids[:, 1:])[keep]
    ce = torch.nn.functional.cross_entropy(logits[keep], ids[:, 1:][keep], reduction="sum")
    return correct.sum().item() / keep.sum().item(), ce.item() / keep.sum().item()


def test_evaluation_without_full_logits_equals_the_full_logits(setup):
    """evaluate_widths streams the LM head in chunks (no [B, T, V] logits); its figures are the full logits'."""
    teacher, supernet, ids, mask = setup
    stats = evaluate_widths(supernet, teacher, [(ids, mask)], [0, 500, 900])
    for key, model in [("teacher", teacher), *[(s, supernet) for s in (0, 500, 900)]]:
        if key != "teacher":
            supernet.set_sparsity(key)
        accuracy, loss = full_logits_stats(model, ids, mask)
        assert stats[key]["accuracy"] == accuracy, key
        assert stats[key]["loss"] == pytest.approx(loss, rel=1e-5), key


def test_choose_ta_by_the_tradeoff():
    performance = {500: 0.88, 700: 0.86, 900: 0.6}
    assert tradeoff(0.85, 700, 0.2) == pytest.approx(0.85 + 0.14)
    best = max(performance, key=lambda s: performance[s] + 0.2 * s / 1000)
    assert choose_ta(performance, 0.2, target=900) == best == 700
    assert choose_ta(performance, 0.05, target=900) == 500  # a small lambda favours performance
    assert choose_ta(performance, 2.0, target=900) is None  # the best is the target itself: no TA needed
    assert choose_ta(performance, 0.2, target=900, current=800) is None


def test_teacher_outputs_keep_only_the_states_the_loss_reads():
    """With 8 layers the hidden MSE reads states 0, 2, 4, 6, 8: the others are dropped (they would stay alive
    across all widths of a step) and the loss is what the full states give."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=8,
                         num_attention_heads=2, num_key_value_heads=2)
    teacher, student = LlamaForCausalLM(config).eval(), LlamaForCausalLM(config).eval()
    ids = torch.randint(3, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    kept = teacher_outputs(teacher, ids)
    assert [i for i, h in enumerate(kept.hidden_states) if h is not None] == [0, 2, 4, 6, 8]
    with torch.no_grad():
        full = teacher.model(input_ids=ids, output_hidden_states=True).hidden_states
    reference = width_loss(student, type(kept)(full, kept.lm_head_weight, kept.lm_head_bias), ids)
    assert torch.equal(width_loss(student, kept, ids)["loss"], reference["loss"])


def test_evaluation_keeps_the_students_dropout_off():
    """The student trains in eval mode (no dropout: deterministic, resumable). The supernet wraps a model loaded
    in eval mode; evaluating every width must leave each module in its mode (it used to switch OPT's dropout on
    for the rest of the sandwich stage)."""
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    model = OPTForCausalLM(OPTConfig(vocab_size=300, hidden_size=48, num_attention_heads=6, ffn_dim=37,
                                     num_hidden_layers=2, word_embed_proj_dim=48, dropout=0.3)).eval()
    calibration = torch.randint(3, 300, (4, 12), generator=torch.Generator().manual_seed(1))
    plan = engine.prune_teacher(model, None, calibration, grid=(0, 500), batch_size=2)
    supernet = engine.Supernet(model, plan)
    ids = torch.randint(3, 300, (2, 10), generator=torch.Generator().manual_seed(2))
    evaluate_widths(supernet, copy.deepcopy(model), [(ids, None)], [0, 500])
    assert not any(module.training for module in supernet.modules())
    supernet.set_sparsity(500)
    with torch.no_grad():
        assert torch.equal(supernet(input_ids=ids).logits, supernet(input_ids=ids).logits)


def test_the_snapshot_ends_at_the_width_choose_ta_picks_on_a_tie():
    """The trainer moves its best snapshot by `snapshot_moves`; `compress` publishes that snapshot as the TA
    `choose_ta` names. On an exact tie of the trade-off both must pick the smaller sparsity (the snapshot used to
    keep the first width that reached the maximum, so ta/ could hold another width than the one reported)."""
    from engine.distillation.selection import best_tradeoff, snapshot_moves

    lam, evaluations = 0.5, [{500: 0.55, 700: 0.5}, {500: 0.6, 700: 0.5}]
    assert tradeoff(0.6, 500, lam) == tradeoff(0.5, 700, lam)  # the second evaluation ties them
    best, snapshot = {}, (float("-inf"), None)
    for p in evaluations:  # what the trainer does at each evaluation
        best = {s: max(best.get(s, 0.0), p[s]) for s in p}
        argmax = best_tradeoff(best, lam)
        score = tradeoff(best[argmax], argmax, lam)
        if snapshot_moves(score, argmax, *snapshot):
            snapshot = (score, argmax)
    assert snapshot[1] == choose_ta(best, lam, target=900) == 500


def test_no_distillation_needs_no_teacher_and_is_the_next_token_loss(setup):
    """ce alone (the `ce` baseline): no teacher outputs at all, the loss and its gradient those of plain CE."""
    _, supernet, ids, mask = setup
    supernet.set_sparsity(500)
    objective = Objective(logit_weight=0.0, hidden_weight=0.0, ce_weight=1.0)
    assert not objective.needs_teacher and Objective().needs_teacher
    losses = width_loss(supernet.model, None, ids, mask, objective)
    losses["loss"].backward()
    got = [p.grad.clone() for p in supernet.parameters() if p.grad is not None]
    supernet.zero_grad()
    next_keep = (mask[:, :-1] * mask[:, 1:]).bool()
    labels = ids[:, 1:].masked_fill(~next_keep, -100)
    ce = torch.nn.functional.cross_entropy(supernet(input_ids=ids).logits[:, :-1].flatten(0, 1), labels.flatten(),
                                           ignore_index=-100)
    ce.backward()
    want = [p.grad for p in supernet.parameters() if p.grad is not None]
    torch.testing.assert_close(losses["loss"].detach(), ce.detach(), rtol=1e-5, atol=1e-6)
    assert losses["logit"] == 0 and losses["hidden"] == 0 and len(got) == len(want)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_scoring_gives_each_test_blocks_figures(setup):
    """score_model's per-block [correct, tokens] (what paired intervals resample) add up to its totals and equal
    each block's full-logits figures."""
    from engine.data.blocks import Split
    from engine.distillation.evaluation import score_model

    teacher, _, ids, mask = setup
    stats = score_model(teacher, Split(ids, mask.bool()), batch_size=1, device="cpu")
    assert len(stats["blocks"]) == len(ids)
    assert sum(c for c, _ in stats["blocks"]) / sum(t for _, t in stats["blocks"]) == stats["accuracy"]
    for (correct, tokens), row, row_mask in zip(stats["blocks"], ids, mask):
        accuracy, _ = full_logits_stats(teacher, row[None], row_mask[None])
        assert tokens == int((row_mask[:-1] & row_mask[1:]).sum()) and correct == round(accuracy * tokens)


def test_without_the_hidden_term_the_teacher_keeps_its_last_state_only(setup):
    teacher, supernet, ids, mask = setup
    supernet.set_sparsity(700)
    objective = Objective(hidden_weight=0.0, ce_weight=0.5)
    lean = teacher_outputs(teacher, ids, hidden_states=False)
    assert [h is not None for h in lean.hidden_states] == [False] * (len(lean.hidden_states) - 1) + [True]
    got = width_loss(supernet.model, lean, ids, mask, objective)
    want = width_loss(supernet.model, teacher_outputs(teacher, ids), ids, mask, objective)
    torch.testing.assert_close(got["loss"], want["loss"])
    assert got["hidden"] == 0 and got["logit"] > 0 and got["ce"] > 0
