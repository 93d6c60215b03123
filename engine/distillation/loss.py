"""The distillation objective of one student width against the teacher (the options in docs/method.md).

loss = logit_weight * T^2 KL-family divergence of the next-token distributions (through
`kernels.fused_linear_distill_loss`, so no [tokens, vocab] logits are built)
     + hidden_weight * MSE of hidden states at every ceil(L/6)-th layer (embedding output and last layer
       included; hidden size is not pruned, so no projection)
     + ce_weight * cross-entropy on the next tokens (optional hard labels; `kernels.fused_linear_cross_entropy`),
all over non-padding tokens; the logit and CE terms never build [tokens, vocab] logits. Defaults by measurement
(benchmarks/bench_objective.py, docs/studies.md): (logit + CE) / 2, ahead of the reference's (logit + hidden) / 2
on every seed of the built-in example.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

import kernels


@dataclass(frozen=True)
class Objective:
    """The distillation loss of a stage: the divergence and the weights of its three terms."""

    kind: str = "forward_kl"  # forward_kl | reverse_kl | jsd
    temperature: float = 1.0
    beta: float = 0.5  # JSD mixture weight
    logit_weight: float = 0.5
    hidden_weight: float = 0.0
    ce_weight: float = 0.5

    @property
    def needs_teacher(self) -> bool:
        """False for training on the next tokens alone (no distillation): then no teacher runs in training."""
        return bool(self.logit_weight or self.hidden_weight)

    @classmethod
    def of(cls, cfg) -> "Objective":
        """From a RunConfig (--loss, --temperature, --jsd-beta and the three weights)."""
        return cls(kind=cfg.loss, temperature=cfg.temperature, beta=cfg.jsd_beta, logit_weight=cfg.logit_weight,
                   hidden_weight=cfg.hidden_weight, ce_weight=cfg.ce_weight)


def hidden_layer_indices(num_layers: int) -> list[int]:
    """Indices into HF `hidden_states` (0 = embeddings, L = last layer) compared by the hidden-state MSE."""
    step = math.ceil(num_layers / 6)
    return sorted(set(range(0, num_layers + 1, step)) | {num_layers})


@dataclass
class TeacherOutputs:
    """What every width of a batch is distilled against (computed once per batch, without gradients)."""

    hidden_states: tuple[torch.Tensor | None, ...]  # HF's (embeddings, every layer; the last normed), None
    # where the hidden-state MSE does not read it
    lm_head_weight: torch.Tensor
    lm_head_bias: torch.Tensor | None


@torch.no_grad()
def teacher_outputs(teacher, input_ids, hidden_states: bool = True) -> TeacherOutputs:
    """The teacher's side of every width's loss. Only the hidden states the loss reads are kept (None for the
    others): they live across all K widths of a step, and the rest would cost (L + 1 - L/6) x tokens x H.
    Without the hidden-state term (`hidden_states=False`) the last one alone, which the logits are made of."""
    # Through the top module (ZeRO-3 starts its parameter trace there: prefetch, persistent parameters kept), with
    # the logits of one position only: the loss reads the head itself.
    out = teacher(input_ids=input_ids, output_hidden_states=True, logits_to_keep=1)
    last = len(out.hidden_states) - 1
    read = set(hidden_layer_indices(last)) if hidden_states else {last}
    hidden = tuple(h if i in read else None for i, h in enumerate(out.hidden_states))
    head = teacher.get_output_embeddings()
    return TeacherOutputs(hidden, head.weight, head.bias)


def width_loss(student, teacher_out: TeacherOutputs, input_ids, loss_mask=None,
               objective: Objective = Objective()) -> dict[str, torch.Tensor]:
    """Distillation losses of `student` (a causal LM, e.g. the supernet's model at its current width).

    Returns {"loss", "logit", "hidden", "ce"} (scalars; only "loss" carries gradients). `loss_mask` [B, T] marks
    the tokens that count (None: all; chat data: the assistant's). Token t predicts t+1, so position t's logit and
    CE terms count when token t+1 does, and the hidden-state term where token t does. Sequences are right-padded,
    if at all, so no attention mask is needed: under causal attention no real token sees the padding after it.
    """
    loss, parts = stacked_width_loss(student, teacher_out, input_ids, loss_mask, objective, copies=1)
    return {"loss": loss, **{name: value[0] for name, value in parts.items() if name != "loss"}}


def stacked_width_loss(student, teacher_out: TeacherOutputs | None, input_ids, loss_mask=None,
                       objective: Objective = Objective(), copies: int = 1) -> tuple[torch.Tensor, dict]:
    """`width_loss` of `copies` stacked widths in one forward: the student runs the batch repeated `copies` times,
    copy k at the k-th width (`Supernet.stack`). Returns (the mean of the widths' losses, the one tensor to
    back-propagate; {"loss", "logit", "hidden", "ce"}: each width's value [copies], detached). `teacher_out` is None
    when the objective needs no teacher (then the logit and hidden terms are 0)."""
    ids = input_ids.repeat(copies, 1)
    # No KV cache: the stacked layers run once per width and would append each width's keys to the same cache.
    out = student.model(input_ids=ids, output_hidden_states=bool(objective.hidden_weight), use_cache=False)
    keep = torch.ones_like(input_ids, dtype=torch.bool) if loss_mask is None else loss_mask.bool()
    next_keep = torch.zeros_like(keep)
    next_keep[:, :-1] = keep[:, 1:]
    head = student.get_output_embeddings()
    logit = hidden = logit_each = torch.zeros(copies, device=out.last_hidden_state.device)
    if objective.needs_teacher:
        logit, logit_each = kernels.fused_linear_distill_loss(
            out.last_hidden_state, head.weight, teacher_out.hidden_states[-1], teacher_out.lm_head_weight,
            student_bias=head.bias, teacher_bias=teacher_out.lm_head_bias, kind=objective.kind, beta=objective.beta,
            temperature=objective.temperature, mask=next_keep.repeat(copies, 1), return_copy_losses=True)
    if objective.hidden_weight:
        layers = hidden_layer_indices(len(out.hidden_states) - 1)
        hidden = sum(_masked_mse(out.hidden_states[i], teacher_out.hidden_states[i], keep)
                     for i in layers) / len(layers)
    ce, loss = torch.zeros(copies, device=logit.device), torch.zeros((), device=logit.device)
    if objective.ce_weight:  # fused like the logit term: no [tokens, vocab] logits, nothing of the head in backward
        ce_mean, ce = kernels.fused_linear_cross_entropy(
            out.last_hidden_state[:, :-1], head.weight, input_ids[:, 1:].repeat(copies, 1), bias=head.bias,
            mask=next_keep[:, :-1].repeat(copies, 1), copies=copies)
        loss = objective.ce_weight * ce_mean
    # logit is the mean over every width's kept tokens, each width keeping the same ones: the mean of their means
    if objective.needs_teacher:  # the logit term even at weight 0: under ZeRO-3 the head needs its (zero) gradient
        loss = loss + objective.logit_weight * logit
    if objective.hidden_weight:
        loss = loss + objective.hidden_weight * hidden.mean()
    hidden, ce = hidden.detach(), ce.detach()
    each = objective.logit_weight * logit_each + objective.hidden_weight * hidden + objective.ce_weight * ce
    return loss, {"loss": each, "logit": logit_each, "hidden": hidden, "ce": ce}


def _masked_mse(student, teacher, keep):
    """Per-token MSE over the kept tokens, per stacked width: student [K*B, T, H] against teacher [B, T, H] -> [K]."""
    student = student.unflatten(0, (-1, teacher.shape[0]))
    diff = (student.float() - teacher.float()).pow(2).mean(-1)  # per width and token
    return (diff * keep).flatten(1).sum(1) / keep.sum().clamp(min=1)
