"""Every width of a supernet (or one plain model) measured in one pass over the dev data, and a model's test
scores per block. The sandwich step that trains them is `engine.training.trainer.train_step`."""
from __future__ import annotations

from typing import Callable

import deepspeed
import torch

import kernels
from engine.core.widths import Shape
from engine.models.supernet import Supernet


def _next_token_stats(model, input_ids, loss_mask, copies: int = 1) -> torch.Tensor:
    """[correct top-1 predictions, summed CE, counted tokens] of a causal LM over non-padding next tokens, per
    stacked width ([copies, 3], float64 on the CPU; `Supernet.stack` activates them)."""
    return _block_stats(model, input_ids, loss_mask, copies).sum(1)


def _block_stats(model, input_ids, loss_mask, copies: int = 1) -> torch.Tensor:
    """`_next_token_stats` per sequence of the batch ([copies, B, 3], float64 on the CPU), from its last hidden states
    and LM head in vocabulary-sized chunks (`kernels.fused_linear_token_stats`): no [B, T, V] logits. Under ZeRO-3
    the head is gathered for the call, like the decoder layers in the model's forward."""
    keep = torch.ones_like(input_ids, dtype=torch.bool) if loss_mask is None else loss_mask.bool()
    keep = keep[:, 1:]  # position t counts when its target, token t + 1, does (right padding: no attention mask)
    lm = model.model if isinstance(model, Supernet) else model
    hidden = lm.model(input_ids=input_ids.repeat(copies, 1), use_cache=False).last_hidden_state[:, :-1]
    head = lm.get_output_embeddings()
    params = [p for p in (head.weight, head.bias) if p is not None]
    rows = []
    with deepspeed.zero.GatheredParameters(params, enabled=hasattr(head.weight, "ds_id")):
        for width_hidden in hidden.chunk(copies):
            correct, nll = kernels.fused_linear_token_stats(width_hidden, head.weight, input_ids[:, 1:],
                                                            bias=head.bias, mask=keep)
            rows.append(torch.stack([correct.sum(1).double(), nll.sum(1).double(), keep.sum(1).double()], 1))
    return torch.stack(rows).cpu()


@torch.no_grad()
def evaluate_widths(student, teacher, batches, widths: list[int], shapes: dict[int, Shape] | None = None,
                    reduce: Callable = lambda totals: totals) -> dict:
    """Accuracy and loss of the teacher and of every width, in one pass over `batches`.

    Each batch (input_ids, loss mask or None) is loaded and run through the teacher once; then every width sees
    the same batch, all of them stacked in one forward (under ZeRO-3 each layer is gathered once for all widths;
    without gradients only one layer's outputs per width are alive). A `Supernet` student is stacked at `shapes`
    (what each width keeps per layer; default its plan's); a plain model is one width. `reduce` sums the
    [correct, loss, tokens] totals over processes.
    Returns {"teacher": stats, permille: stats, ...}, stats = {"accuracy", "loss", "tokens"}.
    """
    totals = torch.zeros(1 + len(widths), 3, dtype=torch.float64)
    modes = [(module, module.training) for module in student.modules()]  # each its own: a wrapper's may differ
    student.eval()
    for input_ids, loss_mask in batches:
        totals[0] += _next_token_stats(teacher, input_ids, loss_mask)[0]
        if isinstance(student, Supernet):
            student.stack([shapes[w] if shapes else student.plan.shape(w) for w in widths])
        totals[1:] += _next_token_stats(student, input_ids, loss_mask, len(widths))
    for module, training in modes:
        module.training = training
    totals = dict(zip(["teacher", *widths], reduce(totals)))
    return {key: {"accuracy": (t[0] / t[2].clamp(min=1)).item(), "loss": (t[1] / t[2].clamp(min=1)).item(),
                  "tokens": int(t[2].item())} for key, t in totals.items()}


@torch.no_grad()
def score_model(model, split, batch_size: int, device) -> dict:
    """Next-token accuracy and loss of a plain causal LM on a split (`engine.data.Split`: the test blocks), and each
    block's [correct, tokens] (`blocks`: what paired intervals between models resample)."""
    model.eval()
    blocks = []
    for ids, mask in split.batches(batch_size):
        mask = None if mask is None else mask.to(device)
        blocks.append(_block_stats(model, ids.to(device), mask)[0])
    per_block = torch.cat(blocks)
    totals = per_block.sum(0)
    tokens = totals[2].clamp(min=1)
    return {"accuracy": (totals[0] / tokens).item(), "loss": (totals[1] / tokens).item(), "tokens": int(totals[2]),
            "blocks": per_block[:, [0, 2]].long().tolist()}
