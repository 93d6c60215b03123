"""Worker for test_runs.py, started by the `deepspeed` launcher with 2 processes (gloo on CPU): a run's set-up
(input checks, tokenising, the splits) with every read of a data source recorded per rank. Rank 0 writes to --out
which sources each rank read."""
import argparse
import json
from pathlib import Path

import engine.data.sources as sources
import engine.schedule.setup as setup_module
from engine.config import RunConfig
from engine.core import distributed as dist

parser = argparse.ArgumentParser()
parser.add_argument("--out", required=True)
parser.add_argument("--options", required=True, help="the run's RunConfig options, as JSON")
parser.add_argument("--local_rank", type=int, default=0)
args = parser.parse_args()

reads = []
original = sources.load_records


def recorded(path, *rest, **options):
    reads.append(str(path))
    return original(path, *rest, **options)


setup_module.load_records = recorded  # the name the run's checks call
setup_module.set_up(RunConfig(**json.loads(args.options)).validate(), "distill")
Path(f"{args.out}.rank{dist.rank()}").write_text(json.dumps(reads))
dist.barrier()
if dist.is_main():
    Path(args.out).write_text(json.dumps({rank: json.loads(Path(f"{args.out}.rank{rank}").read_text())
                                          for rank in range(dist.world_size())}))
