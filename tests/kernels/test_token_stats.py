"""kernels.fused_linear_token_stats against the full logits: the same argmax hits and cross-entropy per token,
over chunk boundaries, with a bias, a mask and bf16 operands; its extra memory does not grow with V."""
import importlib

import pytest
import torch
import torch.nn.functional as F

import kernels

pytestmark = [pytest.mark.gpu]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def reference_token_stats(hidden, weight, targets, bias=None, mask=None):
    logits = (hidden.double() @ weight.double().t() + (0 if bias is None else bias.double()))
    correct = logits.argmax(-1) == targets
    nll = F.cross_entropy(logits.flatten(0, -2), targets.flatten(), reduction="none").view_as(targets)
    if mask is not None:
        correct, nll = correct & mask, nll * mask
    return correct, nll.float()


@pytest.mark.parametrize("shape, vocab, chunk", [((37,), 101, 8), ((3, 11), 257, None), ((2, 9), 64, 1)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_token_stats_match_the_full_logits(shape, vocab, chunk, with_bias):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(*shape, 16, generator=g).to(DEVICE)
    weight = torch.randn(vocab, 16, generator=g).to(DEVICE)
    bias = torch.randn(vocab, generator=g).to(DEVICE) if with_bias else None
    targets = torch.randint(0, vocab, shape, generator=g).to(DEVICE)
    targets.view(-1)[::3] = (hidden @ weight.t() + (0 if bias is None else bias)).argmax(-1).view(-1)[::3]  # hits
    mask = (torch.rand(shape, generator=g) > 0.2).to(DEVICE)
    for m in (None, mask):
        correct, nll = kernels.fused_linear_token_stats(hidden, weight, targets, bias=bias, mask=m, chunk_size=chunk)
        ref_correct, ref_nll = reference_token_stats(hidden, weight, targets, bias, m)
        assert correct.shape == targets.shape and correct.dtype == torch.bool
        assert torch.equal(correct, ref_correct) and correct.any()
        torch.testing.assert_close(nll, ref_nll, rtol=1e-5, atol=1e-4)


def test_bf16_operands_are_summed_in_fp32():
    g = torch.Generator().manual_seed(1)
    hidden, weight = torch.randn(64, 32, generator=g), torch.randn(300, 32, generator=g)
    targets = torch.randint(0, 300, (64,), generator=g)
    _, nll = kernels.fused_linear_token_stats(hidden.bfloat16().to(DEVICE), weight.bfloat16().to(DEVICE),
                                              targets.to(DEVICE))
    _, ref = reference_token_stats(hidden.bfloat16().float(), weight.bfloat16().float(), targets)
    torch.testing.assert_close(nll.cpu(), ref, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("hidden, weight, targets, message", [
    ((4, 8), (10, 7), (4,), "weight must be \\[V, 8\\]"),
    ((4, 8), (10, 8), (5,), "targets must have the hidden states' leading shape"),
])
def test_bad_shapes_are_refused(hidden, weight, targets, message):
    with pytest.raises(ValueError, match=message):
        kernels.fused_linear_token_stats(torch.zeros(hidden), torch.zeros(weight), torch.zeros(targets, dtype=int))


def test_extra_memory_is_one_chunk_whatever_the_vocabulary(monkeypatch):
    """Every [n, V] temporary has at most `chunk_rows(V)` rows: record the largest logits the kernel builds."""
    module = importlib.import_module("kernels.fused_linear_token_stats")  # (the package exports the function)
    seen, logits = [], module._logits

    def recorded(*args):
        out = logits(*args)
        seen.append(out.numel())
        return out

    monkeypatch.setattr(module, "_logits", recorded)
    monkeypatch.setattr(module, "chunk_rows", lambda vocab, chunk, device: max(1, 4096 // vocab))
    for vocab in (64, 512, 2048):
        seen.clear()
        kernels.fused_linear_token_stats(torch.randn(500, 8), torch.randn(vocab, 8), torch.randint(0, vocab, (500,)))
        assert max(seen) <= 4096, (vocab, max(seen))
