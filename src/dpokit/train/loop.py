"""The one training loop every stage shares. A stage supplies a *step*: a callable

    step(model, batch) -> (losses (B,), metrics {name: (B,) tensor})

returning per-example losses and per-example metrics; the loop does everything else: data order,
gradient accumulation, mixed precision, clipping, optimizer and schedule, evaluation, logging,
saving, and (under `torchrun`) data sharding with DDP.

Gradient accumulation weights every example equally, so k micro-batches of b examples give the
gradient of one batch of k*b examples (the per-step loss is sum(losses) / examples-in-the-step).
"""

import contextlib
import math
import os
import random
import resource
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from dpokit.config import save_config
from dpokit.report import Reporter, log


# --- devices and ranks --------------------------------------------------------------------------------

@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed() -> Dist:
    """Single process by default; under `torchrun` (WORLD_SIZE > 1) one process per device, DDP."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    return Dist(rank, world, device)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def set_seed(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def peak_memory_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def autocast(device, precision: str):
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# --- data order ---------------------------------------------------------------------------------------

def micro_batches(n: int, batch_size: int, seed: int, ranks: Dist, start: int = 0):
    """Endless stream of index lists: each epoch a seeded permutation, this rank's share, in chunks.

    `start` skips that many micro-batches (resuming mid-epoch lands on the same examples).
    """
    per_epoch = math.ceil(math.ceil(n / ranks.world) / batch_size)
    epoch, skip = divmod(start, per_epoch)
    while True:
        g = torch.Generator().manual_seed(seed + epoch)
        order = torch.randperm(n, generator=g)[ranks.rank::ranks.world].tolist()
        chunks = [order[i: i + batch_size] for i in range(0, len(order), batch_size)]
        yield from chunks[skip:]
        epoch, skip = epoch + 1, 0


def micro_batches_per_epoch(n, batch_size, ranks: Dist) -> int:
    return math.ceil(math.ceil(n / ranks.world) / batch_size)


# --- optimizer and schedule -------------------------------------------------------------------------

def build_optimizer(cfg, params):
    params = [p for p in params if p.requires_grad]
    if cfg.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)


def lr_lambda(cfg, total_steps: int):
    """Linear warmup to the peak, then constant / linear decay to 0 / cosine decay to 0."""
    def f(step):
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        if cfg.lr_scheduler == "constant":
            return 1.0
        progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
        if cfg.lr_scheduler == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return f


# --- the loop -----------------------------------------------------------------------------------------

class MetricSums:
    """Example-weighted running sums of per-example metrics (all-reduced across ranks on read)."""

    def __init__(self):
        self.sums, self.count = {}, 0

    def add(self, metrics: dict, n: int):
        for k, v in metrics.items():
            self.sums[k] = self.sums.get(k, 0.0) + v.detach().float().sum()
        self.count += n

    def means(self) -> dict:
        if not self.sums:
            return {}
        keys = sorted(self.sums)
        t = all_reduce_sum(torch.stack([self.sums[k] for k in keys] + [torch.tensor(float(self.count))]).cpu())
        return {k: (t[i] / t[-1]).item() for i, k in enumerate(keys)}


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def forward_backward(model, step, micro_batches: list, ranks: Dist, precision: str, sums: "MetricSums") -> int:
    """Accumulate the gradient of one optimizer step over its micro-batches; returns tokens processed.

    Each micro-batch's loss is sum(losses) / (examples in the whole step), so the accumulated gradient
    is that of the mean loss over the step's examples, whatever the micro-batch sizes. Under DDP only
    the last micro-batch all-reduces gradients.
    """
    n_step = sum(b["num_examples"] for b in micro_batches)
    tokens = 0
    for i, batch in enumerate(micro_batches):
        batch = to_device(batch, ranks.device)
        tokens += int(batch["attention_mask"].sum())
        sync = ranks.world == 1 or i == len(micro_batches) - 1
        with (contextlib.nullcontext() if sync else model.no_sync()), autocast(ranks.device, precision):
            losses, metrics = step(model, batch)
            loss = losses.sum() / n_step
        loss.backward()
        sums.add({"loss": losses, **metrics}, batch["num_examples"])
    return tokens


@torch.no_grad()
def evaluate(model, step, collate, examples, cfg, ranks: Dist) -> dict:
    """Example-weighted means of the step's metrics over held-out data, prefixed `eval/`."""
    was_training = model.training
    model.eval()
    sums = MetricSums()
    mine = list(range(len(examples)))[ranks.rank::ranks.world]
    bs = cfg.per_device_eval_batch_size
    for i in range(0, len(mine), bs):
        chunk = [examples[j] for j in mine[i: i + bs]]
        batch = to_device(collate(chunk), ranks.device)
        with autocast(ranks.device, cfg.precision):
            losses, metrics = step(model, batch)
        sums.add({"loss": losses, **metrics}, len(chunk))
    model.train(was_training)
    return {"eval/" + k: v for k, v in sums.means().items()}


def train(cfg, model, tokenizer, step, train_examples, eval_examples, collate, ranks: Dist, save_fn=None):
    """Run the optimisation described by `cfg`; save the final model to cfg.output_dir (rank 0)."""
    out = Path(cfg.output_dir)
    set_seed(cfg.seed)
    model.to(ranks.device)
    model.train()
    if ranks.world > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[ranks.device.index] if ranks.device.type == "cuda" else None)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(cfg, params)
    per_epoch = micro_batches_per_epoch(len(train_examples), cfg.per_device_train_batch_size, ranks)
    total = cfg.max_steps if cfg.max_steps > 0 else \
        max(1, math.ceil(cfg.num_train_epochs * per_epoch / cfg.gradient_accumulation_steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total))
    if ranks.main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
        (out / "metrics.jsonl").unlink(missing_ok=True)
    reporter = Reporter(out, total, enabled=ranks.main, progress_bar=cfg.progress_bar)
    log.info("training: %d examples, %d optimizer steps of %d x %d x %d examples, %d held-out examples",
             len(train_examples), total, cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps,
             ranks.world, len(eval_examples or []))

    def run_eval(step_no):
        if eval_examples:
            reporter.log({"step": step_no, **evaluate(model, step, collate, eval_examples, cfg, ranks)})

    run_eval(0)
    stream = micro_batches(len(train_examples), cfg.per_device_train_batch_size, cfg.seed, ranks)
    window, window_tokens, window_t0 = MetricSums(), 0, time.perf_counter()
    grad_norms = []
    for step_no in range(1, total + 1):
        micro = [collate([train_examples[j] for j in idx])
                 for idx in (next(stream) for _ in range(cfg.gradient_accumulation_steps))]
        window_tokens += forward_backward(model, step, micro, ranks, cfg.precision, window)
        clip = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, clip)
        grad_norms.append(float(grad_norm))
        lr = scheduler.get_last_lr()[0]  # the rate this step uses
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if step_no % cfg.logging_steps == 0 or step_no == total:
            elapsed = time.perf_counter() - window_t0
            tokens = all_reduce_sum(torch.tensor(float(window_tokens))).item()
            row = {"step": step_no, "epoch": round(step_no * cfg.gradient_accumulation_steps / per_epoch, 4),
                   **window.means(), "grad_norm": sum(grad_norms) / len(grad_norms),
                   "learning_rate": lr, "tokens_per_second": tokens / elapsed,
                   "peak_memory_mb": peak_memory_mb(ranks.device)}
            reporter.log(row)
            reporter.step(0, loss=row["loss"], acc=row.get("rewards/accuracies", float("nan")))
            window, window_tokens, window_t0, grad_norms = MetricSums(), 0, time.perf_counter(), []
        reporter.step(1)
        if cfg.eval_steps and step_no % cfg.eval_steps == 0 and step_no != total:
            t0 = time.perf_counter()
            run_eval(step_no)
            window_t0 += time.perf_counter() - t0  # evaluation time is not training throughput
        if cfg.save_steps and step_no % cfg.save_steps == 0 and step_no != total and ranks.main and save_fn:
            save_fn(model, out / f"checkpoint-{step_no}")
    run_eval(total)
    reporter.close()
    if ranks.main and save_fn:
        save_fn(model, out)
    return getattr(model, "module", model)
