"""The order examples are seen in: a seeded permutation per epoch, each rank's strided share of it, cut
into micro-batches. Resuming at micro-batch k replays the same stream from there."""

import math

import torch

from dpokit.train.runtime import Ranks


def micro_batches(n: int, batch_size: int, seed: int, ranks: Ranks, start: int = 0):
    """Endless stream of index lists: each epoch a seeded permutation, this rank's share, in chunks.

    `start` skips that many micro-batches (resuming mid-epoch lands on the same examples).
    """
    per_epoch = math.ceil(math.ceil(n / ranks.world) / batch_size)
    epoch, skip = divmod(start, per_epoch)
    while True:
        g = torch.Generator().manual_seed(seed + epoch)
        order = torch.randperm(n, generator=g)[ranks.rank :: ranks.world].tolist()
        chunks = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        yield from chunks[skip:]
        epoch, skip = epoch + 1, 0


def micro_batches_per_epoch(n, batch_size, ranks: Ranks) -> int:
    return math.ceil(math.ceil(n / ranks.world) / batch_size)
