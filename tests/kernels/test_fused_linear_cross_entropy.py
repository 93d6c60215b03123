"""fused_linear_cross_entropy against plain PyTorch: values and gradients, masks, biases, chunking, stacked copies,
every token ignored."""
import pytest
import torch
import torch.nn.functional as F

from kernels import fused_linear_cross_entropy


def reference(hidden, weight, targets, bias=None, mask=None):
    logits = (hidden.float() @ weight.float().t()) + (0 if bias is None else bias.float())
    labels = targets if mask is None else targets.masked_fill(~mask, -100)
    return F.cross_entropy(logits.flatten(0, -2), labels.flatten(), ignore_index=-100)


def inputs(seed, b=3, t=7, h=16, v=37, bias=True, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, t, h, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=g) * 0.3).to(dtype).requires_grad_()
    b_ = (torch.randn(v, generator=g) * 0.1).to(dtype).requires_grad_() if bias else None
    targets = torch.randint(v, (b, t), generator=g)
    mask = torch.rand(b, t, generator=g) > 0.3
    return hidden, weight, b_, targets, mask


@pytest.mark.parametrize("hidden_size", [16, 32])  # the head's gradient summed in fp32 (21 x 4 >= 4 x 16), or kept
@pytest.mark.parametrize("bias, masked, chunk", [(True, True, 4), (False, False, None), (True, False, 1),
                                                 (False, True, 1000)])
def test_matches_plain_cross_entropy_in_value_and_gradient(bias, masked, chunk, hidden_size):
    from kernels.fused_linear_distill import keeps_logit_grads

    assert keeps_logit_grads(3 * 7, hidden_size, 4) == (hidden_size == 32)  # 21 fp32 logit gradient rows
    hidden, weight, b, targets, mask = inputs(0, h=hidden_size, bias=bias)
    mask = mask if masked else None
    loss, per_copy = fused_linear_cross_entropy(hidden, weight, targets, bias=b, mask=mask, chunk_size=chunk)
    params = [p for p in (hidden, weight, b) if p is not None]
    got = torch.autograd.grad(loss * 1.7, params)  # an upstream gradient other than 1
    want_loss = reference(hidden, weight, targets, b, mask)
    want = torch.autograd.grad(want_loss * 1.7, params)
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(per_copy, want_loss.detach()[None], rtol=1e-5, atol=1e-6)
    for a, w in zip(got, want):
        torch.testing.assert_close(a, w, rtol=1e-4, atol=1e-6)


def test_stacked_copies_give_the_mean_of_their_means_and_each_ones_own():
    hidden, weight, b, targets, mask = inputs(1)
    second = (hidden.detach() * 0.5).requires_grad_()
    stacked = torch.cat([hidden, second])
    loss, per_copy = fused_linear_cross_entropy(stacked, weight, targets.repeat(2, 1), bias=b,
                                                mask=mask.repeat(2, 1), copies=2, chunk_size=5)
    each = torch.stack([reference(h, weight, targets, b, mask) for h in (hidden, second)])
    torch.testing.assert_close(per_copy, each.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss, each.mean(), rtol=1e-5, atol=1e-6)
    got = torch.autograd.grad(loss, [hidden, second, weight])
    want = torch.autograd.grad(each.mean(), [hidden, second, weight])
    for a, w in zip(got, want):
        torch.testing.assert_close(a, w, rtol=1e-4, atol=1e-6)


def test_every_token_ignored_gives_zero_loss_and_gradients():
    hidden, weight, b, targets, _ = inputs(2)
    loss, per_copy = fused_linear_cross_entropy(hidden, weight, targets, bias=b, mask=torch.zeros(3, 7, dtype=bool))
    loss.backward()
    assert loss.item() == 0 and per_copy.item() == 0
    assert not hidden.grad.any() and not weight.grad.any() and not b.grad.any()


def test_bf16_inputs_accumulate_in_fp32():
    hidden, weight, b, targets, mask = inputs(3, dtype=torch.bfloat16)
    loss, _ = fused_linear_cross_entropy(hidden, weight, targets, bias=b, mask=mask)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, reference(hidden, weight, targets, b, mask), rtol=1e-3, atol=1e-3)
    loss.backward()
    assert weight.grad.dtype == torch.bfloat16 and hidden.grad.dtype == torch.bfloat16


def test_bad_shapes_are_clear_errors():
    hidden, weight, _, targets, _ = inputs(5)
    with pytest.raises(ValueError, match=r"weight must be \[V, 16\]"):
        fused_linear_cross_entropy(hidden, weight.t(), targets)
    with pytest.raises(ValueError, match="targets must have the hidden states' leading shape"):
        fused_linear_cross_entropy(hidden, weight, targets[:, :3])
