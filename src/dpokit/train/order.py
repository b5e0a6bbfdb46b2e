"""The order examples are seen in: a seeded permutation per epoch, each rank's strided share of it, cut
into micro-batches, either of per_device_train_batch_size examples or (max_tokens_per_batch) of as many
pairs as fit a token budget. Resuming at micro-batch k replays the same stream from there.

Token-budget batches (budget_batches): with lengths that vary 10x, a fixed number of pairs per batch
either wastes memory on short pairs or runs out of it on long ones. Each epoch the pairs are sorted by
their cost-deciding length (ties in a seeded random order), cut greedily into consecutive runs whose
cost in the batch layout stays within the budget (similar lengths together: little padding), and the
runs are shuffled (seeded), so that the order between buckets is random while each batch stays tight.
Lengths alone decide the cut, so every epoch has the same number of micro-batches, and a resumed run
rebuilds the same stream. The loop weights every pair equally whatever the micro-batch sizes
(loop.forward_backward divides by the examples of the whole step, summed over ranks).
"""

import math

import numpy as np
import torch

from dpokit.data.layouts import layout_name
from dpokit.errors import UserError
from dpokit.train.runtime import Ranks


def stream(cfg, examples, ranks: Ranks, start: int = 0):
    """The training stream the config asks for: token-budget batches when max_tokens_per_batch is set,
    else per_device_train_batch_size examples per micro-batch."""
    budget = getattr(cfg, "max_tokens_per_batch", None)
    if budget:
        return budget_batches(examples, budget, _layout(cfg), cfg.seed, ranks, start)
    return micro_batches(len(examples), cfg.per_device_train_batch_size, cfg.seed, ranks, start)


def per_epoch(cfg, examples, ranks: Ranks) -> int:
    """Micro-batches per epoch on each rank, for the stream() of the same arguments."""
    budget = getattr(cfg, "max_tokens_per_batch", None)
    if budget:
        return budget_batches_per_epoch(examples, budget, _layout(cfg), ranks)
    return micro_batches_per_epoch(len(examples), cfg.per_device_train_batch_size, ranks)


def _layout(cfg) -> str:
    return layout_name(getattr(cfg, "padding_free", False), getattr(cfg, "prefix_sharing", False))


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


# --- token budgets ----------------------------------------------------------------------------------------


def pair_lengths(examples) -> tuple:
    """(prompt, chosen, rejected) token counts, (N,) each: from a PairTable's column offsets, or the pairs."""
    if hasattr(examples, "lengths"):
        return examples.lengths()
    cols = (
        [len(p.prompt_ids) for p in examples],
        [len(p.chosen_ids) for p in examples],
        [len(p.rejected_ids) for p in examples],
    )
    return tuple(np.asarray(c, dtype=np.int64) for c in cols)


def layout_cost(layout: str, prompt, chosen, rejected) -> tuple:
    """(key (N,), rows_per_pair, padded): a batch's tokens in `layout` (data/layouts.py), padding included,
    are rows_per_pair * B * max(key) for a padded layout, sum(key) for a packed one."""
    if layout == "padded":  # (2B, T): T the longest prompt + response
        return np.maximum(prompt + chosen, prompt + rejected), 2, True
    if layout == "packed":  # (1, L): the 2B sequences back to back
        return 2 * prompt + chosen + rejected, 1, False
    if layout == "prefix_shared":  # (B, T): one [prompt | chosen | rejected] row per pair
        return prompt + chosen + rejected, 1, True
    if layout == "prefix_shared_packed":
        return prompt + chosen + rejected, 1, False
    raise ValueError(f"unknown batch layout {layout!r}")


def batch_tokens(layout: str, pairs) -> int:
    """The tokens a batch of these pairs occupies in `layout`, padding included."""
    key, rows, padded = layout_cost(layout, *pair_lengths(pairs))
    return int(rows * len(key) * key.max()) if padded else int(key.sum())


def budget_batches(examples, budget: int, layout: str, seed: int, ranks: Ranks, start: int = 0):
    """Endless stream of index lists whose cost in `layout` is at most `budget` tokens (see the module
    docstring); `start` skips that many of this rank's micro-batches."""
    plan = BudgetPlan(examples, budget, layout)
    per_epoch = _per_rank(len(plan), ranks)
    epoch, skip = divmod(start, per_epoch)
    while True:
        chunks = plan.epoch(seed, epoch)
        yield from chunks[ranks.rank :: ranks.world][skip:]
        epoch, skip = epoch + 1, 0


def budget_batches_per_epoch(examples, budget: int, layout: str, ranks: Ranks) -> int:
    return _per_rank(len(BudgetPlan(examples, budget, layout)), ranks)


def _per_rank(n_chunks: int, ranks: Ranks) -> int:
    return max(1, math.ceil(n_chunks / ranks.world))


class BudgetPlan:
    """The greedy cut of the length-sorted pairs into runs within the budget. Only the runs' sizes are
    fixed here; which pairs fill them is drawn per epoch (ties between equal keys broken at random)."""

    def __init__(self, examples, budget: int, layout: str):
        self.key, rows, padded = layout_cost(layout, *pair_lengths(examples))
        alone = rows * self.key
        over = np.flatnonzero(alone > budget)
        if len(over):
            i = int(over[0])
            row = getattr(examples[i], "row", i + 1)
            raise UserError(
                f"key 'max_tokens_per_batch': the pair of row {row} alone takes {int(alone[i])} tokens in the "
                f"{layout} layout, over the budget of {budget} ({len(over)} pair(s) do); raise the budget or "
                f"lower max_length"
            )
        self.sizes, size, total = [], 0, 0
        for k in np.sort(self.key, kind="stable").tolist():  # ascending: the newest pair is the longest
            fits = (rows * (size + 1) * k if padded else total + k) <= budget
            if size and not fits:
                self.sizes.append(size)
                size, total = 0, 0
            size, total = size + 1, total + k
        if size:
            self.sizes.append(size)

    def __len__(self):
        return len(self.sizes)

    def epoch(self, seed: int, epoch: int) -> list:
        """This epoch's micro-batches: pairs sorted by key with seeded random tie order, cut by the plan's
        sizes, the runs in seeded random order."""
        g = torch.Generator().manual_seed(seed + epoch)
        tie_order = torch.randperm(len(self.key), generator=g).numpy()
        order = tie_order[np.argsort(self.key[tie_order], kind="stable")]
        bounds = np.cumsum([0, *self.sizes])
        chunks = [order[a:b].tolist() for a, b in zip(bounds[:-1], bounds[1:])]
        return [chunks[i] for i in torch.randperm(len(chunks), generator=g).tolist()]
