"""Worker for test_memory.py: three stages in one process (a ZeRO-3 sandwich over two widths, a single-width
stage, a stage with a replicated teacher), as `minidisc compress` runs them. Writes, per stage, the bytes of
live tensors after it (and CUDA's allocated bytes on a GPU) next to the baseline before the first one."""
import argparse
import json
from dataclasses import replace
from pathlib import Path

import torch

import engine
from engine.config import RunConfig
from engine.core import distributed as dist
from engine.data import Mixture, Split
from engine.training.memory import live_tensor_bytes
from engine.training.stage import Data, Stage, TrainConfig
from engine.training.trainer import run_stage

parser = argparse.ArgumentParser()
parser.add_argument("--pruned", required=True)
parser.add_argument("--out", required=True)
args = parser.parse_args()

dist.init()
pruned, work = Path(args.pruned), Path(args.out).parent / "work"
fp32 = Path(__file__).parents[2] / "ds_configs" / "zero3_train_fp32.json"
cfg = RunConfig(teacher=str(pruned), data="-", out="-", max_steps=2, eval_every=1, batch_size=2, seq_len=16,
                deepspeed=str(fp32))
blocks = torch.randint(3, 500, (16, 16), generator=torch.Generator().manual_seed(0))
data = Data(Mixture.of(blocks[:8], seed=0), Split(blocks[8:12], None), Split(blocks[12:], None))
plan = engine.PruningPlan.load(pruned)


def allocated() -> int:
    return torch.cuda.memory_allocated() if torch.cuda.is_available() else 0


report = {"baseline": live_tensor_bytes(), "cuda_baseline": allocated(), "stages": []}
stages = [(Stage("sandwich", pruned, pruned, [0, 500], supernet=True, shapes={w: plan.shape(w) for w in (0, 500)}),
           "zero3"),
          (Stage("single", pruned, pruned, [0]), "zero3"),
          (Stage("replicated", pruned, pruned, [0]), "replicated")]
for stage, placement in stages:
    result = run_stage(stage, TrainConfig.of(replace(cfg, teacher_placement=placement)), data, work)
    report["stages"].append({"name": stage.name, "live": live_tensor_bytes(), "cuda": allocated(),
                             "memory": result.memory})
Path(args.out).write_text(json.dumps(report))
