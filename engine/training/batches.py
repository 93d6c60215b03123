"""What a step trains on: the global batch order (a function of the step), the dev shares, the widths per step."""
from __future__ import annotations

import torch

from engine.pruning.widths import widths_per_step
from engine.training import distributed as dist
from engine.training.deepspeed_config import micro_batch
from engine.training.stage import Stage, TrainConfig


class BatchOrder:
    """Global sample i of the stream is block perm_e[i % n] with perm_e a seeded permutation per epoch, so a
    step's batch depends on the step alone (resume needs no data-loader state). Process r, micro-batch a
    takes its own slice of the global batch, so any process count sees the same global batches."""

    def __init__(self, blocks: torch.Tensor, seed: int):
        self.blocks, self.seed, self._perms = blocks, seed, {}

    def _index(self, i: int) -> int:
        epoch, position = divmod(i, len(self.blocks))
        if epoch not in self._perms:
            self._perms = {epoch: torch.randperm(len(self.blocks),
                                                 generator=torch.Generator().manual_seed(self.seed + epoch))}
        return int(self._perms[epoch][position])

    def batch(self, step: int, micro: int, cfg: TrainConfig) -> torch.Tensor:
        size = micro_batch(cfg)
        start = step * cfg.batch_size + (micro * dist.world_size() + dist.rank()) * size
        return self.blocks[[self._index(i) for i in range(start, start + size)]]


def dev_batches(dev: torch.Tensor, cfg: TrainConfig) -> list:
    """This process's share of the dev blocks (every process gets as many batches: ZeRO-3 forwards are
    collective)."""
    usable = len(dev) - len(dev) % dist.world_size()
    mine = dev[:usable][dist.rank()::dist.world_size()]
    return [(ids.to(dist.device()), None) for ids in mine.split(micro_batch(cfg))]


def widths_at(stage: Stage, cfg: TrainConfig, step: int) -> list[int]:
    """The widths trained at `step`: all, or (sandwich rule) the largest, the smallest and n random others."""
    widths = sorted(stage.widths)
    if widths_per_step(len(widths), cfg.sandwich_sample) == len(widths):
        return widths
    generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    middle = widths[1:-1]
    picked = torch.randperm(len(middle), generator=generator)[: cfg.sandwich_sample].tolist()
    return [widths[0], *sorted(middle[i] for i in picked), widths[-1]]
