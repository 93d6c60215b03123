"""kernels.distill_loss and kernels.fused_linear_distill_loss against a plain, unfused reference."""

import pytest
import torch

import kernels

pytestmark = [pytest.mark.gpu]

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (pip install -e '.[triton]')")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
KINDS = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5), ("jsd", 0.1), ("jsd", 0.0), ("jsd", 1.0)]


def reference_distill(student, teacher, kind, beta, temperature, mask, reduction):
    """Straightforward definitions on full [.., V] tensors (fp32/fp64 math, autograd for gradients)."""
    dtype = torch.float64 if student.dtype == torch.float64 else torch.float32
    log_q = torch.log_softmax(student.to(dtype) / temperature, -1)
    log_p = torch.log_softmax(teacher.to(dtype) / temperature, -1)
    p, q = log_p.exp(), log_q.exp()
    if kind == "jsd" and beta == 0.0:
        kind = "forward_kl"
    if kind == "jsd" and beta == 1.0:
        kind = "reverse_kl"
    if kind == "forward_kl":
        per_token = (p * (log_p - log_q)).sum(-1)
    elif kind == "reverse_kl":
        per_token = (q * (log_q - log_p)).sum(-1)
    else:
        m = beta * p + (1 - beta) * q
        per_token = beta * (p * (log_p - m.log())).sum(-1) + (1 - beta) * (q * (log_q - m.log())).sum(-1)
    per_token = per_token * temperature**2
    if mask is not None:
        per_token = per_token * mask
    if reduction == "none":
        return per_token
    if reduction == "sum":
        return per_token.sum()
    return per_token.sum() / (mask.sum().clamp(min=1) if mask is not None else per_token.numel())


def make_mask(pattern, shape, generator):
    if pattern is None:
        return None
    if pattern == "random":
        return torch.rand(shape, generator=generator) > 0.3
    return torch.zeros(shape, dtype=torch.bool)  # all ignored


def check(loss, ref, grads, ref_grads, dtype):
    tol = dict(atol=1e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(loss.float(), ref.float(), **tol)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.float(), r.float(), **tol)


@pytest.mark.parametrize("kind,beta", KINDS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("mask_pattern", [None, "random", "all_ignored"])
def test_distill_loss_matches_reference(kind, beta, temperature, reduction, mask_pattern):
    g = torch.Generator().manual_seed(0)
    shape = (3, 7, 301)  # [B, T, V], V odd
    student = (torch.randn(shape, generator=g) * 3).requires_grad_()
    teacher = torch.randn(shape, generator=g) * 3
    mask = make_mask(mask_pattern, shape[:2], g)
    upstream = torch.randn(shape[:2], generator=g) if reduction == "none" else torch.tensor(1.7)
    loss = kernels.distill_loss(student, teacher, kind=kind, beta=beta, temperature=temperature, mask=mask,
                                reduction=reduction, backend="torch", chunk_size=5)
    (grad,) = torch.autograd.grad((loss * upstream).sum(), student)
    ref_student = student.detach().double().requires_grad_()
    ref = reference_distill(ref_student, teacher.double(), kind, beta, temperature, mask, reduction)
    (ref_grad,) = torch.autograd.grad((ref * upstream.double()).sum(), ref_student)
    assert loss.shape == ref.shape and loss.dtype == torch.float32
    check(loss, ref, [grad], [ref_grad], torch.float32)
    assert torch.isfinite(grad).all()
    if mask_pattern == "all_ignored":
        assert loss.abs().sum() == 0 and grad.abs().sum() == 0


@pytest.mark.parametrize("kind,beta", KINDS[:3])
def test_distill_loss_bf16_accumulates_in_fp32(kind, beta):
    g = torch.Generator().manual_seed(1)
    student = (torch.randn(64, 1000, generator=g) * 4).bfloat16().requires_grad_()
    teacher = (torch.randn(64, 1000, generator=g) * 4).bfloat16()
    loss = kernels.distill_loss(student, teacher, kind=kind, beta=beta, backend="torch")
    (grad,) = torch.autograd.grad(loss, student)
    assert grad.dtype == torch.bfloat16
    ref_student = student.detach().double().requires_grad_()  # the same bf16 values, exact math
    ref = reference_distill(ref_student, teacher.double(), kind, beta, 1.0, None, "mean")
    (ref_grad,) = torch.autograd.grad(ref, ref_student)
    torch.testing.assert_close(loss.double(), ref, atol=1e-6, rtol=1e-5)  # fp32 accumulation: loss is exact
    torch.testing.assert_close(grad.double(), ref_grad, atol=1e-4, rtol=1e-2)  # only the bf16 output rounds


def test_vocabulary_mismatch():
    student, teacher = torch.randn(4, 10, requires_grad=True), torch.randn(4, 12)
    with pytest.raises(ValueError, match="vocabularies differ.*vocab_size="):
        kernels.distill_loss(student, teacher)
    loss = kernels.distill_loss(student, teacher, vocab_size=10)
    ref = reference_distill(student, teacher[:, :10], "forward_kl", 0.5, 1.0, None, "mean")
    torch.testing.assert_close(loss, ref)
    with pytest.raises(ValueError, match="kind must be one of"):
        kernels.distill_loss(student, teacher, kind="kl", vocab_size=10)


def reference_fused(h_s, w_s, b_s, h_t, w_t, b_t, **kw):
    s = h_s @ w_s.t() + (0 if b_s is None else b_s)
    t = h_t @ w_t.t() + (0 if b_t is None else b_t)
    return reference_distill(s, t, **kw)


@pytest.fixture(params=["summed", "kept"])
def head_grad(request, monkeypatch):
    """Both ways the fused loss makes the head's gradient for "mean" and "sum", whatever the shapes: summed over
    the chunks in an fp32 buffer, or from the logit gradients kept for the backward."""
    from kernels import fused_linear_distill as fld

    monkeypatch.setattr(fld, "keeps_logit_grads", lambda *shape: request.param == "kept")
    return request.param


@pytest.mark.parametrize("kind,beta", KINDS[:3])
@pytest.mark.parametrize("reduction,mask_pattern", [("mean", "random"), ("sum", None), ("none", "random"),
                                                    ("mean", "all_ignored")])
@pytest.mark.parametrize("with_bias", [False, True])
def test_fused_linear_matches_reference(kind, beta, reduction, mask_pattern, with_bias, head_grad):
    g = torch.Generator().manual_seed(2)
    b, t, v, hs, ht = 4, 23, 423, 67, 96  # odd sizes, different hidden sizes
    h_s = torch.randn(b, t, hs, generator=g, requires_grad=True)
    w_s = (torch.randn(v, hs, generator=g) / hs**0.5).requires_grad_()
    b_s = (torch.randn(v, generator=g) * 0.1).requires_grad_() if with_bias else None
    h_t, w_t = torch.randn(b, t, ht, generator=g), torch.randn(v, ht, generator=g) / ht**0.5
    b_t = torch.randn(v, generator=g) * 0.1 if with_bias else None
    mask = make_mask(mask_pattern, (b, t), g)
    upstream = torch.randn(b, t, generator=g) if reduction == "none" else torch.tensor(0.7)
    kw = dict(kind=kind, beta=beta, temperature=1.5, mask=mask, reduction=reduction)
    loss = kernels.fused_linear_distill_loss(h_s, w_s, h_t, w_t, student_bias=b_s, teacher_bias=b_t,
                                             backend="torch", chunk_size=17, **kw)
    inputs = [x for x in (h_s, w_s, b_s) if x is not None]
    grads = torch.autograd.grad((loss * upstream).sum(), inputs)
    ref = reference_fused(h_s, w_s, b_s, h_t, w_t, b_t, **kw)
    ref_grads = torch.autograd.grad((ref * upstream).sum(), inputs)
    assert loss.shape == ref.shape
    check(loss, ref, grads, ref_grads, torch.float32)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_fused_linear_stacked_students_against_one_teacher(reduction, head_grad):
    """K = 3 students stacked along the batch against one teacher (the sandwich's stacked widths): the teacher's rows
    are reused per student (chunks of 17 rows never span two students), the loss is the reference's on the teacher
    repeated 3 times, and each student's own loss comes back with return_copy_losses."""
    g = torch.Generator().manual_seed(4)
    b, t, v, h = 2, 19, 301, 40
    h_s = torch.randn(3 * b, t, h, generator=g, requires_grad=True)
    w_s = (torch.randn(v, h, generator=g) / h**0.5).requires_grad_()
    h_t, w_t = torch.randn(b, t, h, generator=g), torch.randn(v, h, generator=g) / h**0.5
    mask = make_mask("random", (b, t), g).repeat(3, 1)
    kw = dict(kind="jsd", beta=0.3, temperature=1.5, mask=mask, reduction=reduction)
    out = kernels.fused_linear_distill_loss(h_s, w_s, h_t, w_t, backend="torch", chunk_size=17,
                                            return_copy_losses=reduction != "none", **kw)
    loss, each = out if reduction != "none" else (out, None)
    ref = reference_fused(h_s, w_s, None, h_t.repeat(3, 1, 1), w_t, None, **kw)
    upstream = torch.randn(ref.shape, generator=g) if reduction == "none" else torch.tensor(0.7)
    check(loss, ref, torch.autograd.grad((loss * upstream).sum(), (h_s, w_s)),
          torch.autograd.grad((ref * upstream).sum(), (h_s, w_s)), torch.float32)
    if each is not None:
        alone = [reference_fused(part, w_s, None, h_t, w_t, None, **{**kw, "mask": mask[:b]})
                 for part in h_s.chunk(3)]
        torch.testing.assert_close(each, torch.stack(alone).detach(), rtol=1e-5, atol=1e-6)
        if reduction == "mean":  # every student keeps the same tokens: the mean is the mean of their means
            torch.testing.assert_close(loss.detach(), each.mean(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="different token shapes"):
        kernels.fused_linear_distill_loss(h_s[:5], w_s, h_t, w_t, backend="torch")  # 5 rows: not a multiple of 2


def test_fused_linear_large_odd_shape():
    """The issue's odd shape: 4 x 423 tokens, vocabulary 1423, hidden 167."""
    g = torch.Generator().manual_seed(3)
    h_s = torch.randn(4, 423, 167, generator=g, requires_grad=True)
    w_s = (torch.randn(1423, 167, generator=g) / 13).requires_grad_()
    h_t, w_t = torch.randn(4, 423, 167, generator=g), torch.randn(1423, 167, generator=g) / 13
    loss = kernels.fused_linear_distill_loss(h_s, w_s, h_t, w_t, backend="torch")
    grads = torch.autograd.grad(loss, (h_s, w_s))
    ref = reference_fused(h_s, w_s, None, h_t, w_t, None, kind="forward_kl", beta=0.5, temperature=1.0, mask=None,
                          reduction="mean")
    check(loss, ref, grads, torch.autograd.grad(ref, (h_s, w_s)), torch.float32)


@pytest.mark.parametrize("reduction,b,buffers", [("mean", 2, 1), ("mean", 1, 0), ("none", 1, 1)])
def test_fused_linear_bf16_head_is_never_upcast_whole(monkeypatch, reduction, b, buffers):
    """bf16 heads on a CPU (no mixed-precision GEMM there): the heads are upcast a slice at a time and the head
    gradient accumulates a slice of rows at a time, so the only tensor of 4VH bytes made is the fp32 gradient
    buffer, and none where the tokens' logit gradients are smaller than it (3 x 11 tokens < 2H: "mean" keeps them
    for the backward; "none" recomputes the chunks there and sums); the result equals the one-slice computation and
    the fp64 reference on the same bf16 values."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    from kernels import fused_linear_distill as fld

    g = torch.Generator().manual_seed(6)
    t, v, h = 11, 517, 24
    h_s = torch.randn(3 * b, t, h, generator=g).bfloat16().requires_grad_()  # 3 stacked students
    w_s = (torch.randn(v, h, generator=g) / 5).bfloat16().requires_grad_()
    h_t, w_t = torch.randn(b, t, h, generator=g).bfloat16(), (torch.randn(v, h, generator=g) / 5).bfloat16()
    kw = dict(kind="jsd", beta=0.3, temperature=1.0, mask=None, reduction=reduction)
    upstream = torch.randn(3 * b, t, generator=g) if reduction == "none" else torch.tensor(0.7)
    made = []

    class NewStorages(TorchDispatchMode):  # the ops that return a new storage of at least 4VH bytes
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            inputs = {x.untyped_storage().data_ptr() for x in tree_leaves((args, kwargs))
                      if isinstance(x, torch.Tensor)}
            made.extend(func for x in tree_leaves(out) if isinstance(x, torch.Tensor)
                        and x.untyped_storage().nbytes() >= 4 * v * h and x.untyped_storage().data_ptr() not in inputs)
            return out

    def run():
        loss = kernels.fused_linear_distill_loss(h_s, w_s, h_t, w_t, backend="torch", chunk_size=7, **kw)
        return loss, torch.autograd.grad((loss * upstream).sum(), (h_s, w_s))

    monkeypatch.setattr(fld, "SLICE_ELEMENTS", 5 * h + 3, raising=False)  # uneven slices of columns and of rows
    with NewStorages():
        loss, grads = run()
    assert fld.keeps_logit_grads(3 * b * t, h, 2) == (b == 1)  # 33 tokens < 2H = 48 <= 66
    assert len(made) == buffers, made  # the fp32 head gradient (the forward's for "mean", the backward's for "none")
    monkeypatch.setattr(fld, "SLICE_ELEMENTS", 1 << 30)
    whole_loss, whole_grads = run()
    torch.testing.assert_close(loss, whole_loss, rtol=1e-6, atol=1e-7)
    for sliced, whole in zip(grads, whole_grads):
        torch.testing.assert_close(sliced.float(), whole.float(), rtol=1e-2, atol=1e-6)  # a bf16 rounding apart
    inputs = [x.detach().double().requires_grad_() for x in (h_s, w_s)]
    ref = reference_fused(inputs[0], inputs[1], None, h_t.double().repeat(3, 1, 1), w_t.double(), None, **kw)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, torch.autograd.grad((ref * upstream.double()).sum(), inputs)):
        # the logit gradients meet the bf16 head in bf16 (their GEMMs run in the weights' precision)
        torch.testing.assert_close(got.double(), want, rtol=2e-2, atol=1e-2 * want.abs().max().item())


# --- Triton kernels (CUDA, or the interpreter on CPU: small shapes, one large vocabulary block) -------------
@needs_triton
@pytest.mark.parametrize("kind,beta", KINDS)
@pytest.mark.parametrize("reduction,mask_pattern", [("mean", "random"), ("sum", None), ("none", "random"),
                                                    ("mean", "all_ignored")])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_triton_distill_loss_matches_reference(kind, beta, reduction, mask_pattern, temperature):
    g = torch.Generator().manual_seed(4)
    shape = (2, 5, 301)
    student = (torch.randn(shape, generator=g) * 3).to(DEVICE).requires_grad_()
    teacher = (torch.randn(shape, generator=g) * 3).to(DEVICE)
    mask = make_mask(mask_pattern, shape[:2], g)
    mask = None if mask is None else mask.to(DEVICE)
    upstream = (torch.randn(shape[:2], generator=g) if reduction == "none" else torch.tensor(1.3)).to(DEVICE)
    kw = dict(kind=kind, beta=beta, temperature=temperature, mask=mask, reduction=reduction)
    loss = kernels.distill_loss(student, teacher, backend="triton", **kw)
    (grad,) = torch.autograd.grad((loss * upstream).sum(), student)
    ref_student = student.detach().double().requires_grad_()
    ref = reference_distill(ref_student, teacher.double(), kind, beta, temperature, mask, reduction)
    (ref_grad,) = torch.autograd.grad((ref * upstream.double()).sum(), ref_student)
    check(loss, ref, [grad], [ref_grad], torch.float32)


@needs_triton
@pytest.mark.parametrize("kind,beta", KINDS[:3])
def test_triton_fused_linear_and_bf16(kind, beta):
    g = torch.Generator().manual_seed(5)
    h_s = torch.randn(3, 9, 40, generator=g).to(DEVICE).requires_grad_()
    w_s = (torch.randn(517, 40, generator=g) / 6).to(DEVICE).requires_grad_()
    h_t, w_t = torch.randn(3, 9, 56, generator=g).to(DEVICE), (torch.randn(517, 56, generator=g) / 7).to(DEVICE)
    mask = (torch.rand(3, 9, generator=g) > 0.2).to(DEVICE)
    kw = dict(kind=kind, beta=beta, temperature=1.0, mask=mask, reduction="mean")
    loss = kernels.fused_linear_distill_loss(h_s, w_s, h_t, w_t, backend="triton", chunk_size=8, **kw)
    grads = torch.autograd.grad(loss, (h_s, w_s))
    ref = reference_fused(h_s, w_s, None, h_t, w_t, None, **kw)
    check(loss, ref, grads, torch.autograd.grad(ref, (h_s, w_s)), torch.float32)
    # bf16 logits through the Triton distill kernel: fp32 accumulation, only the gradient's storage rounds
    student = (torch.randn(16, 301, generator=g) * 3).bfloat16().to(DEVICE).requires_grad_()
    teacher = (torch.randn(16, 301, generator=g) * 3).bfloat16().to(DEVICE)
    loss = kernels.distill_loss(student, teacher, kind=kind, beta=beta, backend="triton")
    (grad,) = torch.autograd.grad(loss, student)
    ref_student = student.detach().double().requires_grad_()
    ref = reference_distill(ref_student, teacher.double(), kind, beta, 1.0, None, "mean")
    torch.testing.assert_close(loss.double(), ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(grad.double(), torch.autograd.grad(ref, ref_student)[0], atol=1e-4, rtol=1e-2)


def test_backend_choice_errors(monkeypatch):
    x = torch.randn(2, 5)
    with pytest.raises(ValueError, match="backend must be one of"):
        kernels.distill_loss(x, x, backend="cuda")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        kernels.distill_loss(x, x, backend="triton")


def test_fused_linear_second_backward_is_refused():
    h_s = torch.randn(5, 8, requires_grad=True)
    w = torch.randn(11, 8, requires_grad=True)
    loss = kernels.fused_linear_distill_loss(h_s, w, torch.randn(5, 8), torch.randn(11, 8), backend="torch")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward"):
        loss.backward()


@pytest.mark.parametrize("backend", ["torch"] + (["triton"] if HAS_TRITON else []))
@pytest.mark.parametrize("kind,beta", KINDS[:3])
def test_padded_vocabulary_and_nan(backend, kind, beta):
    """-inf logits (masked vocabulary entries) contribute nothing; NaN logits are not silently zeroed."""
    g = torch.Generator().manual_seed(8)
    student = torch.randn(4, 50, generator=g)
    teacher = torch.randn(4, 50, generator=g)
    student[:, 40:] = teacher[:, 40:] = float("-inf")
    student, teacher = student.to(DEVICE).requires_grad_(), teacher.to(DEVICE)
    loss = kernels.distill_loss(student, teacher, kind=kind, beta=beta, backend=backend)
    (grad,) = torch.autograd.grad(loss, student)
    valid = student.detach()[:, :40].double().requires_grad_()
    ref = reference_distill(valid, teacher[:, :40].double(), kind, beta, 1.0, None, "mean")
    torch.testing.assert_close(loss.double(), ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(grad[:, :40].double(), torch.autograd.grad(ref, valid)[0], atol=1e-6, rtol=1e-4)
    assert (grad[:, 40:] == 0).all()
    broken = student.detach().clone()
    broken[1, 3] = float("nan")
    assert torch.isnan(kernels.distill_loss(broken, teacher, kind=kind, beta=beta, backend=backend))
