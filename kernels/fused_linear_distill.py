"""`fused_linear_distill_loss`: the distillation loss straight from hidden states and LM heads.

Tokens are processed in chunks: each chunk's student and teacher logits [chunk, V] are computed in fp32,
turned into losses and logit gradients (`distill_loss.divergence_and_grad`), and folded into the gradients
of the student hidden states, head weight and bias at once, so no N x V fp32 tensor ever exists. For "mean"
and "sum" the gradients are finished in the forward and only scaled in the backward (no second pass over
the vocabulary); for "none" the backward recomputes the chunks with the per-token upstream gradients.

The head's gradient sums over every token chunk, in fp32: a [V, H] fp32 buffer. When the N tokens' logit
gradients, rounded to the head's dtype as its GEMM reads them anyway, take fewer bytes than that buffer (N < 2H
for a bf16 head), they are kept instead and the head's gradient is made in the backward, one vocabulary slice at a
time: the same products in the same precision, summed in one GEMM, without the buffer (a Qwen2.5-0.5B head's is
0.55 GB, beside the bf16 gradient the backward hands on: 0.27 GB more; at 3 x 128 tokens the kept gradients are
0.12 GB).

The student hidden states may stack K students along the first dimension (e.g. K widths of one supernet, each
run on the same tokens): the teacher's hidden states are then read once per student, never copied K times, and
`return_copy_losses=True` also returns each student's own loss. With identical masks, the "mean" over all rows
is the mean of the K students' means.

Under DeepSpeed ZeRO-3 call it inside the forward of the module that owns the head (its weight is gathered
there and the gradient returned here is reduce-scattered into the partition), or gather explicitly with
`deepspeed.zero.GatheredParameters`.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from .distill_loss import (
    check_options,
    chunk_rows,
    common_vocab,
    divergence_and_grad,
    flatten_mask,
    reduce_losses,
    use_triton,
)

# Elements of one upcast slice (64 MB in fp32). CPUs have no low-precision GEMM with an fp32 result, and mixed
# dtypes cannot accumulate in place: done whole, a bf16 [V, H] head would be upcast (4VH bytes) for every
# chunk's logits and gradient, and the head gradient's product (4VH again) made beside the buffer it is added to.
# A Qwen2.5-0.5B head is 0.55 GB in fp32: three such transients were a third of a CPU sandwich step's peak.
SLICE_ELEMENTS = 1 << 24


def _mm_fp32(a, b):
    """a @ b with an fp32 result: low-precision tensor-core GEMM with fp32 output on CUDA; elsewhere the operands
    are upcast, `b` a slice of its columns at a time (at most SLICE_ELEMENTS of it in fp32 at once)."""
    if a.is_cuda and a.dtype == b.dtype and a.dtype != torch.float32:
        return torch.mm(a, b, out_dtype=torch.float32)
    if a.dtype == b.dtype == torch.float32:
        return a @ b
    a, step = a.float(), max(1, SLICE_ELEMENTS // b.shape[0])
    out = torch.empty(a.shape[0], b.shape[1], dtype=torch.float32, device=a.device)
    for start in range(0, b.shape[1], step):
        out[:, start:start + step] = a @ b[:, start:start + step].float()
    return out


def _accumulate(out, a, b):
    """out += a @ b: one in-place GEMM when the dtypes agree, else a slice of out's rows at a time (the fp32
    product of a [V, H] head gradient never exists whole beside `out`)."""
    if a.dtype == b.dtype == out.dtype:
        out.addmm_(a, b)
        return
    step = max(1, SLICE_ELEMENTS // out.shape[1])
    for start in range(0, out.shape[0], step):
        out[start:start + step] += _mm_fp32(a[start:start + step], b)


def _logits(hidden, weight, bias, vocab):
    """fp32 logits [n, vocab] of a chunk (never rounded to bf16 before the softmax)."""
    logits = _mm_fp32(hidden, weight[:vocab].t())
    return logits if bias is None else logits.add_(bias[:vocab].float())


class Options(NamedTuple):
    kind: str
    beta: float
    temperature: float
    vocab: int
    weight_dtype: torch.dtype
    row_loss: Callable  # (student [n, V], teacher [n, V], kind, beta, T, need_grad) -> (losses, grad_logits)


def _chunks(n_student: int, n_teacher: int, step: int):
    """(student rows, teacher rows) of every chunk: a chunk never spans two of the stacked students."""
    for first in range(0, n_student, max(n_teacher, 1)):
        for start in range(0, n_teacher, step):
            stop = min(start + step, n_teacher)
            yield slice(first + start, first + stop), slice(start, stop)


class Grads(NamedTuple):
    """What a pass over the chunks fills: the hidden states' gradient, the bias's (fp32), and the head's either
    summed (`w`, fp32 [V, H]) or kept as the logit gradients it is made of (`logits`, [N, vocab])."""
    h: torch.Tensor
    b: torch.Tensor | None
    w: torch.Tensor | None = None
    logits: torch.Tensor | None = None


def _chunk_losses(o: Options, h_s, w_s, b_s, h_t, w_t, b_t, rows, teacher_rows, row_weights=None,
                  grads: Grads | None = None):
    """Losses of a token chunk; with `grads`, also adds the chunk's gradients (rows scaled by row_weights)."""
    with torch.no_grad():
        student = _logits(h_s[rows], w_s, b_s, o.vocab)
        teacher = _logits(h_t[teacher_rows], w_t, b_t, o.vocab)
        losses, grad_logits = o.row_loss(student, teacher, o.kind, o.beta, o.temperature, grads is not None)
        if grads is not None:
            grad_logits.mul_(row_weights[rows, None])
            if grads.b is not None:
                grads.b[: o.vocab] += grad_logits.sum(0)
            grad_logits = grad_logits.to(w_s.dtype)  # head-gradient GEMMs run in the weights' precision
            grads.h[rows] = _mm_fp32(grad_logits, w_s[: o.vocab]).to(grads.h.dtype)
            if grads.logits is not None:
                grads.logits[rows] = grad_logits
            else:
                _accumulate(grads.w[: o.vocab], grad_logits.t(), h_s[rows])
    return losses


def keeps_logit_grads(rows: int, hidden: int, element_size: int) -> bool:
    """Whether `rows` tokens' logit gradients in the head's dtype (`element_size` bytes) take fewer bytes than the
    head's fp32 gradient buffer ([V, hidden]): then they are kept for the backward instead of summed."""
    return rows * element_size < 4 * hidden


def _zero_grads(h_s, w_s, b_s, vocab: int, keep_logit_grads: bool = False) -> Grads:
    fp32 = dict(dtype=torch.float32, device=w_s.device)
    grad_b = None if b_s is None else torch.zeros(b_s.shape, **fp32)
    if keep_logit_grads:
        return Grads(torch.empty_like(h_s), grad_b, logits=torch.empty(h_s.shape[0], vocab, dtype=w_s.dtype,
                                                                       device=w_s.device))
    return Grads(torch.empty_like(h_s), grad_b, w=torch.zeros(w_s.shape, **fp32))


def _head_grad(grad_logits, h_s, shape, scale, dtype):
    """The head's gradient [V, H] in `dtype`: grad_logits.T @ h_s * scale, a slice of vocabulary rows at a time in
    fp32 (rows past grad_logits' vocabulary get zero)."""
    out = torch.zeros(shape, dtype=dtype, device=h_s.device)
    vocab, step = grad_logits.shape[1], max(1, SLICE_ELEMENTS // max(h_s.shape[0], h_s.shape[1]))
    for start in range(0, vocab, step):
        stop = min(start + step, vocab)
        out[start:stop] = _mm_fp32(grad_logits[:, start:stop].t(), h_s).mul_(scale).to(dtype)
    return out


class FusedLinearDistill(torch.autograd.Function):
    """reduce=True: returns (sum_i row_weights[i] * loss_i, the per-token losses, not differentiable), the
    gradients finished in the forward; reduce=False: returns the per-token losses and recomputes the chunks in the
    backward. Student row r is compared with teacher row r mod len(teacher rows) (stacked students)."""

    @staticmethod
    def forward(ctx, h_s, w_s, b_s, h_t, w_t, b_t, row_weights, options: Options, chunk_size, reduce):
        step = chunk_rows(options.vocab, chunk_size, h_s.device)
        losses = torch.empty(h_s.shape[0], dtype=torch.float32, device=h_s.device)
        grads = None
        if reduce:
            keep = keeps_logit_grads(h_s.shape[0], w_s.shape[1], w_s.element_size())
            grads = _zero_grads(h_s, w_s, b_s, options.vocab, keep)
        for rows, teacher_rows in _chunks(h_s.shape[0], h_t.shape[0], step):
            losses[rows] = _chunk_losses(options, h_s, w_s, b_s, h_t, w_t, b_t, rows, teacher_rows, row_weights,
                                         grads)
        ctx.options, ctx.step, ctx.reduce, ctx.has_bias = options, step, reduce, b_s is not None
        if reduce:
            ctx.head_shape = w_s.shape
            # the head's gradient: summed, or the logit gradients and the hidden states it is made of
            head = (grads.w,) if grads.logits is None else (grads.logits, h_s)
            ctx.save_for_backward(grads.h, *([] if grads.b is None else [grads.b]), *head)
            ctx.mark_non_differentiable(losses)
            zero = torch.zeros((), dtype=losses.dtype, device=losses.device)
            return torch.where(row_weights > 0, losses * row_weights, zero).sum(), losses
        ctx.save_for_backward(h_s, w_s, b_s, h_t, w_t, b_t, row_weights)
        return losses

    @staticmethod
    def backward(ctx, grad_out, *_):
        if ctx.reduce:  # grad_out is the scalar upstream gradient
            if getattr(ctx, "consumed", False):
                raise RuntimeError("fused_linear_distill_loss: a second backward through the same loss is not "
                                   "supported (its gradients were finished in the forward and are scaled in place)")
            ctx.consumed = True
            dtype = ctx.options.weight_dtype
            grad_h, *rest = ctx.saved_tensors
            grad_b = rest.pop(0).mul_(grad_out) if ctx.has_bias else None
            grad_h = grad_h.mul_(grad_out.to(grad_h.dtype))  # ours: scale in place
            grad_w = (rest[0].mul_(grad_out).to(dtype) if len(rest) == 1 else
                      _head_grad(*rest, ctx.head_shape, grad_out, dtype))
        else:
            h_s, w_s, b_s, h_t, w_t, b_t, kept = ctx.saved_tensors
            grads = _zero_grads(h_s, w_s, b_s, ctx.options.vocab)
            for rows, teacher_rows in _chunks(h_s.shape[0], h_t.shape[0], ctx.step):
                _chunk_losses(ctx.options, h_s, w_s, b_s, h_t, w_t, b_t, rows, teacher_rows, grad_out * kept, grads)
            grad_h, grad_b, grad_w = grads.h, grads.b, grads.w.to(ctx.options.weight_dtype)
        return (grad_h, grad_w, None if grad_b is None else grad_b.to(ctx.options.weight_dtype),
                None, None, None, None, None, None, None)


def fused_linear_distill_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, *, student_bias=None,
                              teacher_bias=None, kind="forward_kl", beta=0.5, temperature=1.0, mask=None,
                              reduction="mean", backend="auto", vocab_size=None, chunk_size=None,
                              return_copy_losses=False):
    """Distillation divergence of `student_hidden @ student_weight.T (+ bias)` against the teacher's, never
    materialising the [N, V] logits. Hidden states are [N, H] or [B, T, H] (H may differ between student
    and teacher); heads are [V, H]. Gradients flow to the student hidden states, weight and bias.

    The student's first dimension may be K times the teacher's ([K*N, H] or [K*B, T, H]): K students stacked,
    each against the same teacher tokens; `mask` has the student's leading shape. With `return_copy_losses`
    (reductions "mean" and "sum") also returns each student's loss under the reduction, [K], not differentiable."""
    kind = check_options(kind, beta, temperature, reduction, backend)
    copies = _copies(student_hidden.shape[:-1], teacher_hidden.shape[:-1])
    if return_copy_losses and reduction == "none":
        raise ValueError("return_copy_losses needs reduction 'mean' or 'sum' (with 'none' every token's loss is "
                         "returned already)")
    for name, hidden, weight in (("student", student_hidden, student_weight), ("teacher", teacher_hidden,
                                                                               teacher_weight)):
        if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
            raise ValueError(f"{name} weight must be [V, {hidden.shape[-1]}] to match its hidden states, got "
                             f"{tuple(weight.shape)}")
    vocab = common_vocab(student_weight.shape[0], teacher_weight.shape[0], vocab_size)
    leading = student_hidden.shape[:-1]
    h_s = student_hidden.reshape(-1, student_hidden.shape[-1])
    h_t = teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1])
    flat_mask = flatten_mask(mask, leading, h_s.device)
    w_t, b_t = teacher_weight.detach(), None if teacher_bias is None else teacher_bias.detach()
    kept = torch.ones(h_s.shape[0], dtype=torch.float32, device=h_s.device) if flat_mask is None else flat_mask.float()
    row_weights = kept / kept.sum().clamp(min=1) if reduction == "mean" else kept  # tensor ops: no host sync
    if use_triton(backend, h_s):
        from .triton_distill import triton_row_loss as row_loss
    else:
        row_loss = divergence_and_grad
    options = Options(kind, float(beta), float(temperature), vocab, student_weight.dtype, row_loss)
    out = FusedLinearDistill.apply(h_s, student_weight, student_bias, h_t, w_t, b_t, row_weights, options,
                                   chunk_size, reduction != "none")
    if reduction == "none":
        return reduce_losses(out, flat_mask, "none", leading)
    loss, losses = out
    if not return_copy_losses:
        return loss
    kept = kept.view(copies, -1)
    sums = (torch.where(kept > 0, losses.view(copies, -1), 0.0) * kept).sum(1)
    return loss, sums if reduction == "sum" else sums / kept.sum(1).clamp(min=1)


def _copies(student_shape, teacher_shape) -> int:
    """K, the number of students stacked in the student's first dimension (1: the shapes are equal)."""
    copies = student_shape[0] // max(teacher_shape[0], 1) if len(student_shape) else 1
    if student_shape[1:] != teacher_shape[1:] or copies < 1 or copies * teacher_shape[0] != student_shape[0]:
        raise ValueError(f"student and teacher hidden states have different token shapes: {tuple(student_shape)} vs "
                         f"{tuple(teacher_shape)} (the student's first dimension may be a multiple of the teacher's: "
                         "stacked students)")
    return copies
