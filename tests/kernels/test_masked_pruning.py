"""Masked activations (SwiGLU, ReLU, per-head) and their dL/dmask against autograd on the plain formulas."""
import pytest
import torch
import torch.nn.functional as F

import kernels

pytestmark = [pytest.mark.gpu]

BACKENDS = ["torch"]
try:
    import triton  # noqa: F401

    BACKENDS.append("triton")
except ImportError:
    pass
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(shape, generator, dtype):
    return (torch.randn(shape, generator=generator) * 2).to(DEVICE, dtype).requires_grad_()


def _tol(dtype):
    return dict(atol=1e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("op", ["swiglu", "relu", "heads"])
def test_masked_op_matches_reference(backend, dtype, op):
    g = torch.Generator().manual_seed(0)
    shape = (3, 11, 37) if op != "heads" else (3, 11, 5 * 8)  # 37 neurons; 5 heads of 8 columns
    units = 37 if op != "heads" else 5
    x = _inputs(shape, g, dtype)
    up = _inputs(shape, g, dtype)
    mask = torch.rand(units, generator=g).to(DEVICE).requires_grad_()
    mask_ref = mask.detach().clone().requires_grad_()
    grad_h = torch.randn(shape, generator=g).to(DEVICE, dtype)
    if op == "swiglu":
        out = kernels.masked_swiglu(x, up, mask, backend=backend)
        ref = F.silu(x.float()) * up.float() * mask_ref
        inputs = (x, up, mask)
    elif op == "relu":
        out = kernels.masked_relu(x, mask, backend=backend)
        ref = F.relu(x.float()) * mask_ref
        inputs = (x, mask)
    else:
        out = kernels.masked_heads(x, mask, 8, backend=backend)
        ref = x.float() * mask_ref.repeat_interleave(8)
        inputs = (x, mask)
    grads = torch.autograd.grad((out.float() * grad_h.float()).sum(), inputs)
    ref_inputs = [t for t in inputs if t is not mask] + [mask_ref]
    ref_grads = torch.autograd.grad((ref * grad_h.float()).sum(), ref_inputs)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), ref.float(), **_tol(dtype))
    for got, want in zip(grads, ref_grads):
        scale = max(1.0, want.abs().max().item()) if dtype == torch.bfloat16 else 1.0
        torch.testing.assert_close(got.float() / scale, want.float() / scale, **_tol(dtype))


def test_mask_shape_errors():
    x = torch.randn(2, 12)
    with pytest.raises(ValueError, match="mask must be 1-D with 12 entries"):
        kernels.masked_relu(x, torch.ones(6))
    with pytest.raises(ValueError, match="not 4 units x 4 columns"):
        kernels.masked_heads(x, torch.ones(4), 4)
