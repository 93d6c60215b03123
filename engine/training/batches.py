"""What a step trains on: the global batch order (a function of the step), the dev shares, the widths per step."""
from __future__ import annotations

import torch

from engine.core import distributed as dist
from engine.core.widths import widths_per_step
from engine.data.blocks import Mixture, Split
from engine.training.deepspeed_config import micro_batch
from engine.training.stage import Stage, TrainConfig


class BatchOrder:
    """Global sample i of the stream is the training Mixture's sample i (a function of the seed), so a step's batch
    depends on the step alone (resume needs no data-loader state). Process r, micro-batch a takes its own slice of
    the global batch, so any process count sees the same global batches, and reads only its own blocks."""

    def __init__(self, train: Mixture):
        self.train = train

    def batch(self, step: int, micro: int, cfg: TrainConfig) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(ids [micro_batch, seq_len], loss mask or None)."""
        size = micro_batch(cfg)
        start = step * cfg.batch_size + (micro * dist.world_size() + dist.rank()) * size
        return self.train.take(range(start, start + size))


def dev_batches(dev: Split, cfg: TrainConfig) -> list:
    """This process's share of the dev blocks, (ids, loss mask or None) per batch (every process gets as many
    batches: ZeRO-3 forwards are collective)."""
    usable = len(dev) - len(dev) % dist.world_size()
    mine = Split(dev.ids[:usable][dist.rank()::dist.world_size()],
                 None if dev.mask is None else dev.mask[:usable][dist.rank()::dist.world_size()])
    return [(ids.to(dist.device()), None if mask is None else mask.to(dist.device()))
            for ids, mask in mine.batches(micro_batch(cfg))]


def widths_at(stage: Stage, cfg: TrainConfig, step: int) -> list[int]:
    """The widths trained at `step`: all, or (sandwich rule) the largest, the smallest and n random others."""
    widths = sorted(stage.widths)
    if widths_per_step(len(widths), cfg.sandwich_sample) == len(widths):
        return widths
    generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    middle = widths[1:-1]
    picked = torch.randperm(len(middle), generator=generator)[: cfg.sandwich_sample].tolist()
    return [widths[0], *sorted(middle[i] for i in picked), widths[-1]]
