"""Reordering, nested candidates, the supernet against the masked teacher, and importance."""
import copy

import pytest
import torch
from helpers import CONFIGS, tiny_model

import engine
from engine.core.widths import Shape
from engine.models.export import kept_regions
from engine.models.families import family_for
from engine.pruning.importance import unit_importance
from engine.pruning.masks import masked, shape_masks

FAMILIES = list(CONFIGS)


def calibration(seed=1, n=4, length=12):
    return torch.randint(3, 300, (n, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(params=FAMILIES)
def pruned(request):
    """(family name, original model, reordered model, plan)."""
    original = tiny_model(request.param)
    model = copy.deepcopy(original)
    plan = engine.prune_teacher(model, None, calibration(), batch_size=2)
    return request.param, original, model, plan


def test_reorder_changes_no_output(pruned):
    _, original, model, plan = pruned
    x = calibration(seed=7)
    torch.testing.assert_close(model(x).logits, original(x).logits, atol=1e-5, rtol=0)
    # ...and it really permuted something: scores are stored in descending order per layer
    assert all(s == sorted(s, reverse=True) for s in plan.attention_scores + plan.ffn_scores)
    assert any(order != sorted(order) for order in plan.extra["original_index"]["ffn"])


def test_a_checkpoint_reordered_tensor_by_tensor_equals_the_reordered_model(pruned, tmp_path, monkeypatch):
    """`write_reordered` (rank 0 after a launch: no model in memory) writes what reordering the model in memory
    writes, every family and unit kind; in shards of a few tensors with their index, which transformers loads."""
    from transformers import AutoModelForCausalLM

    from engine.models import export
    from engine.models.export import skeleton
    from engine.pruning.reorder import write_reordered

    _, original, model, plan = pruned
    original.save_pretrained(tmp_path / "teacher")
    monkeypatch.setattr(export, "SHARD_BYTES", 20_000)  # a tiny model's tensors: 10-90 kB
    _, family, structure = skeleton(tmp_path / "teacher")
    if hasattr(model.config, "minidisc_attention_unit"):  # query-head units, as `prune` sets them
        structure.config.minidisc_attention_unit = model.config.minidisc_attention_unit
    order = plan.extra["original_index"]
    (tmp_path / "out").mkdir()
    write_reordered(tmp_path / "teacher", structure, family_for(structure.config), order["attention"], order["ffn"],
                    tmp_path / "out")
    shards = sorted(p.name for p in (tmp_path / "out").glob("*.safetensors"))
    assert len(shards) > 2 and (tmp_path / "out" / "model.safetensors.index.json").is_file()
    model.config.save_pretrained(tmp_path / "out")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    expected = model.state_dict()
    assert loaded.state_dict().keys() == expected.keys()
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, expected[name]), name


def test_candidates_are_nested_and_reach_empty_layers(pruned):
    _, _, _, plan = pruned
    shapes = [plan.shape(p) for p in plan.grid]
    assert shapes[0] == plan.full_shape
    for wider, narrower in zip(shapes, shapes[1:]):
        assert wider.contains(narrower)
    assert 0 in shapes[-1].attention + shapes[-1].ffn  # the sparsest candidate empties some layer
    params = [row["parameters"] for row in plan.candidates]
    assert params == sorted(params, reverse=True)


def _masked_logits_and_grads(model, shape, x):
    family = family_for(model.config)
    model.zero_grad()
    with masked(model, family, *shape_masks(model, family, shape)):
        out = model(input_ids=x, labels=x)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_supernet_equals_masked_teacher_values_and_gradients(pruned):
    name, _, model, plan = pruned
    supernet = engine.Supernet(copy.deepcopy(model), plan)
    x = calibration(seed=3)
    shapes = [plan.shape(p) for p in plan.grid]
    n_layers = len(shapes[0].attention)
    # hand-made extremes: a layer with no heads next to one with no neurons, and everything empty
    shapes += [Shape((0,) + shapes[0].attention[1:], shapes[0].ffn[:1] + (0,) * (n_layers - 1)),
               Shape((0,) * n_layers, (0,) * n_layers)]
    for shape in shapes:
        supernet.set_shape(shape)
        supernet.zero_grad()
        out = supernet(input_ids=x, labels=x)
        out.loss.backward()
        ref_logits, ref_grads = _masked_logits_and_grads(model, shape, x)
        torch.testing.assert_close(out.logits, ref_logits, atol=1e-5, rtol=0, msg=f"{name} logits at {shape}")
        for param_name, param in supernet.model.named_parameters():
            # every parameter gets a gradient, exactly zero when its layer kept no units (ZeRO-3 needs one)
            assert param.grad is not None, f"{param_name} left out of the graph at {shape}"
            torch.testing.assert_close(param.grad, ref_grads[param_name], atol=1e-5, rtol=1e-4,
                                       msg=f"{name} grad of {param_name} at {shape}")


def test_supernet_over_a_ta_slice_equals_the_teachers_at_sparser_widths(pruned):
    """A joint TA -> student stage trains a supernet over the TA checkpoint (a per-layer pruned model): at every
    grid width past the TA it computes what the teacher's supernet computes, and its gradients are those of the
    teacher's prefix."""
    name, _, model, plan = pruned
    ta = plan.grid[len(plan.grid) // 2]
    sliced = engine.pruned_model(model, plan.shape(ta))
    over_ta, over_teacher = engine.Supernet(sliced, plan), engine.Supernet(copy.deepcopy(model), plan)
    assert over_ta.full_shape == plan.shape(ta) and over_teacher.full_shape == plan.full_shape
    x = calibration(seed=4)
    for sparsity in [s for s in plan.grid if s > ta]:
        outputs = []
        for supernet in (over_ta, over_teacher):
            supernet.set_sparsity(sparsity)
            supernet.zero_grad()
            out = supernet(input_ids=x, labels=x)
            out.loss.backward()
            outputs.append((out.logits.detach(), dict(supernet.model.named_parameters())))
        (mine, ta_params), (reference, teacher_params) = outputs
        torch.testing.assert_close(mine, reference, atol=1e-5, rtol=0, msg=f"{name} at {sparsity}")
        regions = kept_regions(model, family_for(model.config), plan.shape(ta))  # the TA's part of each tensor
        for param_name, param in ta_params.items():
            part = regions.get(param_name, (slice(None),))
            torch.testing.assert_close(param.grad, teacher_params[param_name].grad[part], atol=1e-5, rtol=1e-4,
                                       msg=f"{name} grad of {param_name} at {sparsity}")


def test_set_sparsity_uses_the_grid(pruned):
    _, _, model, plan = pruned
    supernet = engine.Supernet(model, plan)
    assert supernet.set_sparsity(0.9) == plan.shape(900)
    with pytest.raises(engine.UserError, match="not on the pruning grid"):
        supernet.set_sparsity(0.33)


@pytest.mark.parametrize("name", FAMILIES)
def test_importance_matches_weight_scaling_reference(name):
    """|dL/dmask| per batch, summed, against an autograd reference that scales the projection weights.

    Masking unit u's input to o_proj/down_proj equals scaling the matching weight columns, so the reference
    builds W * scale with a leaf `scale` through torch.func.functional_call (no hooks, no engine masks).
    """
    model = tiny_model(name)
    family = family_for(model.config)
    batches = list(calibration(seed=5, n=4, length=10).split(2))
    attention, ffn = unit_importance(model, family, batches)

    names = {id(module): n for n, module in model.named_modules()}
    params = dict(model.named_parameters())
    for layer_index, (attn_group, ffn_group) in enumerate(family.groups(model, per_head=family.query_head_units)):
        for group, scores in ((attn_group, attention[layer_index]), (ffn_group, ffn[layer_index])):
            weight_name = names[id(group.mask_site)] + ".weight"
            reference = torch.zeros(group.num_units)
            for x in batches:
                scale = torch.ones(group.num_units, requires_grad=True)
                scaled = params[weight_name] * scale.repeat_interleave(group.cols_per_unit)[None, :]
                out = torch.func.functional_call(model, {**params, weight_name: scaled}, (),
                                                 {"input_ids": x, "labels": x})
                reference += torch.autograd.grad(out.loss, scale)[0].abs()
            torch.testing.assert_close(scores.float(), reference, rtol=1e-4, atol=1e-7)
            assert reference.abs().sum() > 0


def test_unsupported_family_is_named():
    from transformers import GPT2Config

    with pytest.raises(engine.UserError, match="unsupported model family 'gpt2'.*LlamaForCausalLM.*OPTForCausalLM"):
        family_for(GPT2Config())


@pytest.mark.parametrize("name", FAMILIES)
def test_fused_importance_equals_unfused(name):
    """The masked-pruning kernels (SwiGLU/ReLU/per-head) give the importance of the plain masked path."""
    model = tiny_model(name)
    family = family_for(model.config)
    batches = list(calibration(seed=6, n=4, length=10).split(2))
    fused = unit_importance(model, family, batches, fused=True)
    plain = unit_importance(model, family, batches, fused=False)
    for got, want in zip(fused[0] + fused[1], plain[0] + plain[1]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-8)
    # every hook and swapped activation is undone
    assert not any(m._forward_pre_hooks or "forward" in vars(m) for m in model.modules())
    assert not any(type(m).__name__ == "_MaskedReLU" for m in model.modules())


@pytest.mark.parametrize("name", ["llama_gqa", "opt"])
def test_forward_flops_match_a_flop_counter(name):
    """`forward_flops` (Kaplan's estimate: 2 per linear weight, 2 x context x attention width per layer) against
    torch's FLOP counter on the real pruned model: its matmuls, plus half of its attention batch-matmuls (the
    counter counts the full T x T scores; causal attention uses half of them). Not the rotary embedding's, which
    transformers 5.0 computes as a batch-matmul of positions and frequencies (5.24 as a broadcast product)."""
    from torch.utils.flop_counter import FlopCounterMode

    from engine.models.export import pruned_model
    from engine.models.units import forward_flops

    model = tiny_model(name)
    family = family_for(model.config)
    units = [(a.num_units, f.num_units) for a, f in family.groups(model)]
    width = Shape(attention=tuple(a - 1 - i % 2 for i, (a, _) in enumerate(units)),
                  ffn=tuple(f - 5 * i for i, (_, f) in enumerate(units)))
    small = pruned_model(model, width).eval()
    small.config._attn_implementation = "eager"  # attention as batch-matmuls the counter sees
    ids = torch.randint(0, 100, (2, 16))
    with FlopCounterMode(display=False) as counter:
        small(input_ids=ids)
    per_module = counter.get_flop_counts()
    counts = {str(op): n for op, n in per_module["Global"].items()}
    for module, ops in per_module.items():  # rotary frequencies: a bmm in some transformers releases, no weights
        if module.endswith("rotary_emb"):
            counts["aten.bmm"] -= ops.get(torch.ops.aten.bmm, 0)
    expected = counts.pop("aten.bmm") / 2 + sum(counts.values())
    assert forward_flops(model, family, width, context=16) * ids.numel() == expected


def test_query_head_units_rank_each_kv_groups_heads():
    """Query-head units: heads are scored one by one, each KV group's heads are sorted best first, and unit j scores
    the sum of every group's j-th best head (normalised per layer like any unit)."""
    model = tiny_model("llama_gqa_qh")
    family = family_for(model.config)
    heads, _ = unit_importance(copy.deepcopy(model), family, list(calibration().split(2)))
    plan = engine.prune_teacher(model, None, calibration(), batch_size=2, attention_norm="layer")
    assert plan.attention_unit == "query-head" and plan.attention_sizes == [3, 3, 3]  # 6 heads = 2 groups x 3
    for layer, scores in enumerate(heads):
        by_group = scores.reshape(2, 3)
        assert plan.extra["original_index"]["attention"][layer] == by_group.argsort(1, descending=True).tolist()
        units = by_group.sort(1, descending=True).values.sum(0)
        torch.testing.assert_close(torch.tensor(plan.attention_scores[layer], dtype=units.dtype), units / units.norm())


def test_attention_norm_none_ranks_attention_as_measured():
    """--attention-norm none: attention scores are ranked as measured (no per-layer normalisation); FFN scores are
    still divided by their layer's L2 norm."""
    model = tiny_model("llama_gqa")
    raw, _ = unit_importance(copy.deepcopy(model), family_for(model.config), list(calibration().split(2)))
    plan = engine.prune_teacher(model, None, calibration(), batch_size=2, attention_norm="none")
    for layer, scores in enumerate(raw):
        torch.testing.assert_close(torch.tensor(plan.attention_scores[layer], dtype=scores.dtype),
                                   scores.sort(descending=True).values)
    assert all(abs(torch.tensor(s, dtype=torch.float64).norm().item() - 1) < 1e-6 for s in plan.ffn_scores)  # fp32
    assert plan.extra["attention_norm"] == "none"
    default = engine.prune_teacher(tiny_model("llama_gqa"), None, calibration(), batch_size=2)
    assert default.extra["attention_norm"] == "layer"
    assert all(abs(torch.tensor(s).norm().item() - 1) < 1e-6 for s in default.attention_scores)
