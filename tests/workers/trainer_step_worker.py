"""Worker for test_trainer.py: two optimiser steps of the DeepSpeed trainer (ZeRO-3 supernet, 3 widths per
step, AdamW, linear decay, weight decay) against a plain PyTorch reference of the same maths: each width's
loss weighted 1/K over the global batch, one AdamW step per batch. Run alone (a world of one) or under the
`deepspeed` launcher; rank 0 writes the largest parameter difference to --out."""
import argparse
import json
import os
from dataclasses import replace
from pathlib import Path

import torch

import engine
from engine.config import RunConfig
from engine.core import distributed as dist
from engine.core.widths import forwards_per_batch
from engine.data import Mixture
from engine.distillation.loss import Objective, teacher_outputs, width_loss
from engine.models.loading import load_causal_lm
from engine.training import engines
from engine.training.batches import BatchOrder
from engine.training.engines import BETAS, _lr_lambda, _no_decay, build_engines
from engine.training.stage import Stage, TrainConfig
from engine.training.trainer import PARTS, train_step

parser = argparse.ArgumentParser()
parser.add_argument("--pruned", required=True)
parser.add_argument("--out", required=True)
parser.add_argument("--grad-accum", type=int, default=1)
parser.add_argument("--stack", type=int, default=1, help="widths per forward (--stack-widths; 0 = all)")
parser.add_argument("--checkpointing", type=int, default=0, help="1: --gradient-checkpointing")
parser.add_argument("--local_rank", type=int, default=0)
args = parser.parse_args()

dist.init()
# Adam divides by sqrt(v) + eps: with the usual eps = 1e-8 a gradient entry near 1e-8 turns float noise from a
# different reduction order into lr-sized differences. A larger eps keeps the comparison about the maths.
EPS = engines.EPS = 1e-3
fp32 = Path(__file__).parents[2] / "ds_configs" / "zero3_train_fp32.json"
cfg = RunConfig(teacher=args.pruned, data="-", out="-", max_steps=4, warmup_ratio=0.0, lr=3e-3, max_grad_norm=0.0,
                batch_size=4, grad_accum=args.grad_accum, weight_decay=0.1, deepspeed=str(fp32), ce_weight=0.2,
                gradient_checkpointing=bool(args.checkpointing))
plan = engine.PruningPlan.load(args.pruned)
widths = [500, 700, 900]
objective = Objective.of(cfg)

# Reference: unsharded, built before DeepSpeed switches ZeRO-3 on.
teacher_ref = load_causal_lm(args.pruned).eval()
reference = engine.Supernet(load_causal_lm(args.pruned), plan)
named = list(reference.named_parameters())
optimizer = torch.optim.AdamW([{"params": [p for n, p in named if not _no_decay(n, p)], "weight_decay": 0.1},
                               {"params": [p for n, p in named if _no_decay(n, p)], "weight_decay": 0.0}],
                              lr=cfg.lr, betas=BETAS, eps=EPS)
schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(TrainConfig.of(cfg)))
initial = {n: p.detach().clone() for n, p in named}

stage = Stage("step", Path(args.pruned), Path(args.pruned), widths, supernet=True,
              shapes={w: plan.shape(w) for w in widths})
backwards = forwards_per_batch(len(widths), args.stack)  # per micro-batch
teacher, ds_engine, distiller, keep_alive, _ = build_engines(stage, TrainConfig.of(cfg), backwards)
blocks = torch.randint(3, 500, (8, 16), generator=torch.Generator().manual_seed(0))
order = BatchOrder(Mixture.of(blocks, seed=0))
collectives = []  # all_sum calls per step: the losses, the finite check and the requeue flag travel together
all_sum = dist.all_sum
dist.all_sum = lambda tensor: collectives.append(tensor.numel()) or all_sum(tensor)
shapes = stage.shapes
for step in range(2):
    micro = [order.batch(step, a, cfg) for a in range(cfg.grad_accum)]
    before = len(collectives)
    outcome = train_step(teacher, ds_engine, micro, widths, objective, shapes, per_forward=args.stack)
    assert outcome.finite and not outcome.signalled and len(outcome.losses) == len(widths)
    assert collectives[before:] == [len(widths) * len(PARTS) + 2], collectives
    # the same step, by hand: the whole global batch, each width 1/K
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(0))  # epoch 0's order of the 8 blocks
    batch = blocks[perm[step * 4: step * 4 + 4]]
    optimizer.zero_grad()
    t_out = teacher_outputs(teacher_ref, batch)
    for s in widths:
        reference.set_sparsity(s)
        (width_loss(reference.model, t_out, batch, None, objective)["loss"] / len(widths)).backward()
    optimizer.step()
    schedule.step()

import deepspeed  # noqa: E402

error, moved, worst = 0.0, 0.0, ""
for (name, param), (ref_name, ref_param) in zip(distiller.named_parameters(), named):
    assert name == "student." + ref_name, (name, ref_name)
    with deepspeed.zero.GatheredParameters([param]):
        full = param.detach().clone()
    diff = (full - ref_param.detach()).abs().max().item()
    if diff > error:
        error, worst = diff, ref_name
    moved = max(moved, (ref_param.detach() - initial[ref_name]).abs().max().item())

# A step whose loss is not finite is reported to every rank and the optimiser does not step.
def full_weights():
    with deepspeed.zero.GatheredParameters(list(distiller.parameters())):
        return [p.detach().clone() for p in distiller.parameters()]


kept = full_weights()
poisoned = train_step(teacher, ds_engine, [order.batch(2, a, cfg) for a in range(cfg.grad_accum)], widths,
                      replace(objective, hidden_weight=float("nan")), shapes, per_forward=args.stack)
unchanged = all(torch.equal(a, b) for a, b in zip(kept, full_weights()))
if dist.is_main():
    Path(args.out).write_text(json.dumps({"world_size": dist.world_size(), "error": error, "worst": worst,
                                           "moved": moved, "collectives": collectives,
                                           "nan_step": {"finite": poisoned.finite, "unchanged": unchanged}}))
dist.barrier()
torch.distributed.destroy_process_group()
# Even after that, a gloo thread still aborts the interpreter's exit now and then ("terminate called without an
# active exception", seen in CI on this worker): the report is written and closed, so leave without the teardown.
print(end="", flush=True)  # (os._exit skips flushing)
os._exit(0)
