"""Metrics as the loop keeps them: example-weighted sums all-reduced across ranks, and metrics.jsonl made
resume-safe (rows after the checkpoint dropped, a torn last line tolerated)."""

import json
from pathlib import Path

import torch

from dpokit.io import atomic_write_text
from dpokit.report import log
from dpokit.train.runtime import all_reduce_sum


class MetricSums:
    """Example-weighted running sums of per-example metrics (all-reduced across ranks on read).

    A metric is a (B,) tensor averaged over all examples, or a (values, mask) pair averaged over the
    examples the mask selects (e.g. KTO's rewards of desirable examples only).
    """

    def __init__(self):
        self.sums, self.counts, self.count = {}, {}, 0

    def add(self, metrics: dict, n: int):
        for k, v in metrics.items():
            values, mask = v if isinstance(v, tuple) else (v, None)
            values = values.detach().float()
            if mask is None:
                total, count = values.sum(), float(n)
            else:
                mask = mask.detach().float()
                total, count = (values * mask).sum(), mask.sum().item()
            self.sums[k] = self.sums.get(k, 0.0) + total.cpu()
            self.counts[k] = self.counts.get(k, 0.0) + count
        self.count += n

    def merge(self, other: "MetricSums"):
        for k, v in other.sums.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
            self.counts[k] = self.counts.get(k, 0.0) + other.counts[k]
        self.count += other.count

    def state(self) -> dict:
        return {"sums": {k: float(v) for k, v in self.sums.items()}, "counts": self.counts, "count": self.count}

    def load(self, state: dict):
        self.sums = {k: torch.tensor(v, dtype=torch.float32) for k, v in state["sums"].items()}
        self.counts, self.count = dict(state["counts"]), state["count"]

    def means(self) -> dict:
        if not self.sums:
            return {}
        keys = sorted(self.sums)
        t = torch.stack(
            [torch.as_tensor(self.sums[k], dtype=torch.float32) for k in keys]
            + [torch.tensor(float(self.counts[k])) for k in keys]
        )
        t = all_reduce_sum(t.cpu())
        n = len(keys)
        return {k: (t[i] / t[n + i]).item() for i, k in enumerate(keys) if t[n + i] > 0}


def truncate_metrics(path: Path, step: int, drop_eval: bool = False):
    """On resume, drop the lines a killed run wrote after its checkpoint; on a fresh start, all of them.

    A line that does not parse (a torn last line: the run was killed mid-write) is dropped with a
    warning. `drop_eval` also drops the evaluation rows of `step` itself (resuming from the final
    checkpoint, whose evaluation runs again). The file is replaced atomically."""
    if not path.exists():
        return
    keep = []
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True) if step else []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if not isinstance(row, dict) or not isinstance(row.get("step", 0), (int, float)):
            log.warning(
                "%s: line %d is not a metrics row (%s), dropped",
                path,
                i,
                "torn by a kill mid-write" if i == len(lines) else "damaged",
            )
            continue
        row_step = row.get("step", 0)
        if row_step > step:
            continue
        if drop_eval and row_step == step and any(k.startswith("eval/") for k in row):
            continue
        keep.append(line if line.endswith("\n") else line + "\n")
    atomic_write_text(path, "".join(keep))
