"""Worker for test_prune_sharded.py, started by the `deepspeed` launcher with 2 processes (gloo on CPU): `engine.prune`
on every rank, the teacher partitioned by ZeRO-3 while its units are scored. Rank 0 writes the pruned teacher to
--pruned and, to --out, whether every weight the scorer saw was a shard and whether the teacher was streamed."""
import argparse
import json
from pathlib import Path

import engine
import engine.pruning.prune as pruning
from engine.core import distributed as dist

parser = argparse.ArgumentParser()
parser.add_argument("--teacher", required=True)
parser.add_argument("--data", required=True)
parser.add_argument("--pruned", required=True)
parser.add_argument("--attention-unit", default="kv-group")
parser.add_argument("--out", required=True)
parser.add_argument("--local_rank", type=int, default=0)
args = parser.parse_args()

dist.init()
seen = {}
original = pruning.unit_importance


def recorded(model, family, batches, **options):
    """Was each weight partitioned (a rank holds less than all of it) when the scorer ran?"""
    seen["sharded"] = all(p.ds_tensor.numel() < p.ds_numel for p in model.parameters() if p.ds_numel > 1)
    seen["batches"] = len(batches)
    return original(model, family, batches, **options)


pruning.unit_importance = recorded  # the name `sharded_importance` calls
write_reordered = pruning.write_reordered


def streamed(*args_, **options):
    """Rank 0 writes the reordered teacher from the checkpoint, a tensor at a time."""
    seen["streamed"] = True
    return write_reordered(*args_, **options)


pruning.write_reordered = streamed
ds_config = json.loads((Path(__file__).parents[2] / "ds_configs" / "zero3_inference.json").read_text())
ds_config["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # every weight partitioned
plan = engine.prune(args.teacher, args.data, args.pruned, calib_samples=6, seq_len=16, batch_size=2,
                    attention_unit=args.attention_unit, ds_config=ds_config)
assert (plan is not None) == dist.is_main()
Path(f"{args.out}.rank{dist.rank()}").write_text(json.dumps(seen))
dist.barrier()
if dist.is_main():
    Path(args.out).write_text(json.dumps([json.loads(Path(f"{args.out}.rank{r}").read_text()) for r in range(2)]))
