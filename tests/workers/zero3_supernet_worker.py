"""Worker for test_zero3.py, started by the `deepspeed` launcher with 2 processes (gloo on CPU).

Every rank runs the same batch through the supernet under ZeRO-3 (parameters partitioned across ranks,
sliced inside each module's forward after DeepSpeed gathered them) and through an unsharded copy, for
several widths, and rank 0 writes the largest logit and gradient differences to --out.
"""
import argparse
import json
import os
from pathlib import Path

import deepspeed
import torch
from deepspeed.utils import safe_get_full_grad
from transformers.integrations import HfDeepSpeedConfig

import engine
from engine.core.widths import Shape
from engine.models.loading import load_causal_lm

parser = argparse.ArgumentParser()
parser.add_argument("--pruned", required=True)
parser.add_argument("--out", required=True)
parser.add_argument("--local_rank", type=int, default=0)
args = parser.parse_args()

deepspeed.init_distributed(dist_backend="gloo")
# The shipped ZeRO-3 training config, in fp32 for an exact comparison, with every parameter partitioned.
ds_config = json.loads((Path(__file__).parents[2] / "ds_configs" / "zero3_train.json").read_text())
ds_config.update(train_micro_batch_size_per_gpu=2, bf16={"enabled": False}, gradient_clipping=0.0)
ds_config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
plan = engine.PruningPlan.load(args.pruned)
reference = engine.Supernet(load_causal_lm(args.pruned), plan)  # loaded before ZeRO-3 is switched on
keep_alive = HfDeepSpeedConfig(ds_config)  # from_pretrained now builds the model partitioned (zero.Init)
supernet = engine.Supernet(load_causal_lm(args.pruned), plan)
assert all(p.ds_tensor.numel() < p.ds_numel for p in supernet.parameters() if p.ds_numel > 1), "not partitioned"
optimizer = torch.optim.SGD(supernet.parameters(), lr=0.0)
ds_engine, *_ = deepspeed.initialize(model=supernet, optimizer=optimizer, config=ds_config)

x = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(0))
n_layers = len(plan.attention_scores)
shapes = [plan.shape(0.0), plan.shape(0.5), plan.shape(0.95),
          Shape((0,) + plan.full_shape.attention[1:], (0,) * n_layers)]
report = []
for shape in shapes:
    supernet.set_shape(shape)
    reference.set_shape(shape)
    reference.zero_grad()
    expected = reference(input_ids=x, labels=x)
    expected.loss.backward()
    out = ds_engine(input_ids=x, labels=x)
    ds_engine.backward(out.loss)
    grad_error = 0.0
    for (name, param), ref_param in zip(ds_engine.module.named_parameters(), reference.parameters()):
        grad = safe_get_full_grad(param)
        assert grad is not None and ref_param.grad is not None, f"{name} got no gradient at {shape}"
        grad_error = max(grad_error, (grad.reshape(param.ds_shape) - ref_param.grad).abs().max().item())
    ds_engine.step()
    report.append({"width": [list(shape.attention), list(shape.ffn)], "grad_error": grad_error,
                   "logit_error": (out.logits.detach() - expected.logits.detach()).abs().max().item(),
                   "grad_norm": sum(p.grad.norm() ** 2 for p in reference.parameters() if p.grad is not None).item()})
if torch.distributed.get_rank() == 0:
    with open(args.out, "w") as f:
        json.dump({"world_size": torch.distributed.get_world_size(), "widths": report}, f)
# A clean shutdown: exiting with the process group alive lets a gloo thread abort the process at exit
# ("terminate called without an active exception"), which the launcher reports as a failed rank.
torch.distributed.barrier()
torch.distributed.destroy_process_group()
# Even after that, a gloo thread still aborts the interpreter's exit now and then ("terminate called without an
# active exception", seen in CI on this worker): the report is written and closed, so leave without the teardown.
print(end="", flush=True)  # (os._exit skips flushing)
os._exit(0)
