"""The one training loop every stage shares. A stage supplies a *step*: a callable

    step(model, batch) -> (losses (B,), metrics {name: (B,) tensor})

returning per-example losses and per-example metrics; the loop does everything else: data order,
gradient accumulation, mixed precision, clipping, optimizer and schedule, evaluation, logging,
saving, and (under `torchrun`) data sharding with DDP.

Gradient accumulation weights every example equally, so k micro-batches of b examples give the
gradient of one batch of k*b examples (the per-step loss is sum(losses) / examples-in-the-step).
"""

import contextlib
import json
import math
import os
import random
import resource
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from dpokit.config import save_config, to_dict
from dpokit.errors import Interrupted, UserError
from dpokit.precision import resolve_for as resolve_precision
from dpokit.report import Reporter, log
from dpokit.train import checkpoint
from dpokit.train.checkpoint import fault_point
from dpokit.train.lock import RunLock, check_free


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
        # metrics are reduced as CPU tensors: gloo for those, nccl for the gradients on GPUs
        dist.init_process_group("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
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
    """bf16 autocast (fp32 master weights) or nothing; `auto` picks what the device runs natively."""
    if resolve_precision(device, precision) == "bf16":
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
        t = torch.stack([torch.as_tensor(self.sums[k], dtype=torch.float32) for k in keys] +
                        [torch.tensor(float(self.counts[k])) for k in keys])
        t = all_reduce_sum(t.cpu())
        n = len(keys)
        return {k: (t[i] / t[n + i]).item() for i, k in enumerate(keys) if t[n + i] > 0}


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
        tokens += int(batch["num_tokens"])
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


def check_output_dir(cfg, n_params: int = 0):
    """Fail before any work when output_dir cannot be written, or its disk cannot hold a checkpoint."""
    p = Path(cfg.output_dir)
    while not p.exists():
        p = p.parent
    if not p.is_dir() or not os.access(p, os.W_OK):
        raise UserError(f"{cfg.output_dir}: output_dir is not writable")
    if os.environ.get("RANK", "0") == "0":  # (rank 0's own lock, taken in train(), is no other run)
        check_free(cfg.output_dir)  # another live run writes there: say so now, not after loading the model
    if n_params:
        need = n_params * 4 * 3  # fp32 weights + two optimizer moments, written next to the previous checkpoint
        free = shutil.disk_usage(p).free
        if free < need:
            raise UserError(f"{cfg.output_dir}: only {free / 2**30:.2f} GiB free, a checkpoint needs "
                            f"about {need / 2**30:.2f} GiB")


class StopSignal:
    """SIGINT / SIGTERM: finish the current step, checkpoint, and exit (a second signal exits at once,
    with that signal's code: 130 for SIGINT, 143 for SIGTERM)."""

    def __init__(self):
        self.received = None

    def __enter__(self):
        self.previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        for s in self.previous:
            signal.signal(s, self.handle)
        return self

    def handle(self, signum, frame):
        if self.received is not None:
            raise Interrupted(signal.Signals(signum).name, at_once=True)
        self.received = signal.Signals(signum).name
        log.warning("%s received: finishing this step, then saving a checkpoint", self.received)

    def __exit__(self, *exc):
        for s, h in self.previous.items():
            signal.signal(s, h)


# keys that may differ between a run and its resumption without changing the result
RESUME_FREE_KEYS = {"resume", "progress_bar", "logging_steps", "eval_steps", "save_steps", "save_total_limit",
                    "max_nonfinite_steps", "output_dir", "per_device_eval_batch_size", "max_eval_examples"}


def check_resumable(cfg, state, path):
    saved = state.get("config", {})
    diff = [k for k, v in to_dict(cfg).items() if k not in RESUME_FREE_KEYS and k in saved and saved[k] != v]
    if diff:
        raise UserError(f"{path}: cannot resume: the config differs in {', '.join(diff)} "
                        f"(checkpoint has {', '.join(f'{k}={saved[k]!r}' for k in diff)})")


def all_finite(params) -> bool:
    """Whether every value of every tensor is finite: one max-abs per tensor (no overflow, unlike a
    sum of squares; NaN propagates through max), one host sync."""
    params = [p.detach() for p in params]
    if not params:
        return True
    return bool(torch.isfinite(torch.stack(torch._foreach_norm(params, float("inf"))).max()))


def train(cfg, model, tokenizer, step, train_examples, eval_examples, collate, ranks: Dist, save_fn=None):
    """Run the optimisation described by `cfg`; checkpoint every save_steps and at the end; save the
    final model to cfg.output_dir (rank 0). Resumes from a checkpoint when cfg.resume says so.

    Rank 0 holds output_dir's lock (train/lock.py) from before it reads a checkpoint until the final
    model is written; a second run on the same output_dir stops before writing anything. An
    output_dir this call created is removed again when the run fails before writing into it."""
    out = Path(cfg.output_dir)
    lr = getattr(cfg, "learning_rate", 0.0)
    if not lr < torch.finfo(torch.float32).max:  # torch's optimizers would raise on the first step
        raise UserError(f"key 'learning_rate': {lr} does not fit in float32")
    created = not out.exists()
    lock, refused = RunLock(out), None
    if ranks.main:
        try:
            lock.acquire()
        except UserError as e:
            refused = e
    # every rank stops when rank 0 could not take the lock
    if ranks.world > 1 and all_reduce_sum(torch.tensor([float(refused is not None)])).item() and refused is None:
        refused = UserError(f"{out}: output_dir is in use by another run (rank 0 could not lock it)")
    if refused is not None:
        raise refused
    try:
        return _train(cfg, model, tokenizer, step, train_examples, eval_examples, collate, ranks, save_fn)
    finally:
        lock.release()
        if created and ranks.main and out.is_dir() and not any(out.iterdir()):
            out.rmdir()


def _train(cfg, model, tokenizer, step, train_examples, eval_examples, collate, ranks: Dist, save_fn=None):
    out = Path(cfg.output_dir)
    set_seed(cfg.seed)
    model.to(ranks.device)
    model.train()
    raw_model = model
    if ranks.world > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[ranks.device.index] if ranks.device.type == "cuda" else None)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(cfg, params)
    per_epoch = micro_batches_per_epoch(len(train_examples), cfg.per_device_train_batch_size, ranks)
    total = cfg.max_steps if cfg.max_steps > 0 else \
        max(1, math.ceil(cfg.num_train_epochs * per_epoch / cfg.gradient_accumulation_steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total))

    window, window_tokens, grad_norms, start_step = MetricSums(), 0, [], 0
    resume_from = checkpoint.find_resume(cfg.resume, out)
    if resume_from is not None:
        state = checkpoint.load_checkpoint(resume_from, raw_model, optimizer)
        check_resumable(cfg, state, resume_from)
        scheduler.load_state_dict(state["scheduler"])
        if hasattr(step, "load_state_dict"):
            step.load_state_dict(state.get("step_state", {}))
            step.load_state(resume_from)
        start_step = state["step"]
        window.load(state["window"])
        window_tokens, grad_norms = state["window_tokens"], state["grad_norms"]
        log.info("resuming from %s (step %d of %d)", resume_from, start_step, total)
    if ranks.main:
        out.mkdir(parents=True, exist_ok=True)
        checkpoint.sweep_temporary(out)
        save_config(cfg, out / "config.yaml")
        # resumed from the final checkpoint: its evaluation runs again below, so its old row goes
        truncate_metrics(out / "metrics.jsonl", start_step, drop_eval=start_step == total)
    reporter = Reporter(out, total, enabled=ranks.main, progress_bar=cfg.progress_bar, initial=start_step)
    log.info("training: %d examples, %d optimizer steps of %d x %d x %d examples, %d held-out examples",
             len(train_examples), total, cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps,
             ranks.world, len(eval_examples or []))

    def run_eval(step_no):
        if eval_examples:
            reporter.log({"step": step_no, **evaluate(model, step, collate, eval_examples, cfg, ranks)})

    def save_checkpoint(step_no):
        state = {"scheduler": scheduler.state_dict(), "micro_batches": step_no * cfg.gradient_accumulation_steps,
                 "window": window.state(), "window_tokens": window_tokens, "grad_norms": grad_norms,
                 "config": to_dict(cfg), "step_state": step.state_dict() if hasattr(step, "state_dict") else {}}

        if not all_finite(raw_model.parameters()):  # (never: every step checks; a checkpoint must not be the first)
            raise UserError(f"step {step_no}: refusing to save a checkpoint of non-finite weights")

        def write(directory):
            save_fn(raw_model, directory)
            if hasattr(step, "save_state"):
                step.save_state(directory)
        path = None
        if ranks.main and save_fn:
            reporter.sync()  # the metric rows up to this step are on disk before the checkpoint is
            path = checkpoint.save_checkpoint(out, step_no, write, optimizer, state, cfg.save_total_limit)
        if dist.is_initialized():
            dist.barrier()
        return path

    if start_step == 0:
        run_eval(0)
    stream = micro_batches(len(train_examples), cfg.per_device_train_batch_size, cfg.seed, ranks,
                           start=start_step * cfg.gradient_accumulation_steps)
    window_t0, nonfinite = time.perf_counter(), 0
    with StopSignal() as stop:
        for step_no in range(start_step + 1, total + 1):
            micro = [collate([train_examples[j] for j in idx])
                     for idx in (next(stream) for _ in range(cfg.gradient_accumulation_steps))]
            step_sums = MetricSums()
            tokens = forward_backward(model, step, micro, ranks, cfg.precision, step_sums)
            clip = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, clip))
            step_loss = step_sums.means().get("loss", 0.0)
            lr = scheduler.get_last_lr()[0]  # the rate this step uses
            if math.isfinite(grad_norm) and math.isfinite(step_loss):
                optimizer.step()
                if not all_finite(params):  # finite gradients, yet e.g. a huge learning_rate overflowed
                    last = checkpoint.list_checkpoints(out)
                    raise UserError(f"stopped at step {step_no}: the optimizer step made the weights non-finite "
                                    f"(lower learning_rate); nothing of this step was saved; last good "
                                    f"checkpoint: {last[-1] if last else 'none'}")
                if hasattr(step, "after_optimizer_step"):
                    step.after_optimizer_step(step_no, raw_model)
                nonfinite = 0
                window.merge(step_sums)
                window_tokens += tokens
                grad_norms.append(grad_norm)
            else:  # skip the update, keep the schedule moving so a resumed run stays in step
                nonfinite += 1
                reporter.log({"step": step_no, "skipped": "non-finite loss or gradient",
                              "loss": step_loss, "grad_norm": grad_norm})
                if nonfinite >= cfg.max_nonfinite_steps:
                    last = checkpoint.list_checkpoints(out)
                    raise UserError(f"stopped at step {step_no}: {nonfinite} steps in a row with a non-finite "
                                    f"loss or gradient (lower learning_rate or use fp32); last good checkpoint: "
                                    f"{last[-1] if last else 'none'}")
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            fault_point(f"step:{step_no}")
            if (step_no % cfg.logging_steps == 0 or step_no == total) and window.count:
                elapsed = time.perf_counter() - window_t0
                tokens_all = all_reduce_sum(torch.tensor(float(window_tokens))).item()
                row = {"step": step_no, "epoch": round(step_no * cfg.gradient_accumulation_steps / per_epoch, 4),
                       **window.means(), "grad_norm": sum(grad_norms) / max(1, len(grad_norms)),
                       "learning_rate": lr, "tokens_per_second": tokens_all / elapsed,
                       "peak_memory_mb": peak_memory_mb(ranks.device)}
                reporter.log(row)
                shown = {k: row[k] for k in ("loss", "rewards/accuracies", "accuracy", "reward") if k in row}
                reporter.step(0, **{k.split("/")[-1]: v for k, v in shown.items()})
                window, window_tokens, window_t0, grad_norms = MetricSums(), 0, time.perf_counter(), []
            reporter.step(1)
            t0 = time.perf_counter()
            if cfg.eval_steps and step_no % cfg.eval_steps == 0 and step_no != total:
                run_eval(step_no)
            if cfg.save_steps and step_no % cfg.save_steps == 0 and step_no != total and not nonfinite:
                save_checkpoint(step_no)  # never in a run of non-finite steps: the last good one stays newest
            window_t0 += time.perf_counter() - t0  # evaluation and saving are not training throughput
            if stop.received and step_no != total:
                path = save_checkpoint(step_no)
                reporter.close()
                raise Interrupted(stop.received, path)
        # a first signal from here on just lets the run finish; a second still stops at once
        run_eval(total)
        last = save_checkpoint(total)
        reporter.close()
        if ranks.main and save_fn:
            if not all_finite(raw_model.parameters()):
                raise UserError(f"refusing to save non-finite weights to {out}")
            raw_model = checkpoint.save_final(out, lambda d: save_fn(raw_model, d, final=True), last) \
                or raw_model  # (a LoRA model comes back merged)
    return raw_model


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
            log.warning("%s: line %d is not a metrics row (%s), dropped", path, i,
                        "torn by a kill mid-write" if i == len(lines) else "damaged")
            continue
        row_step = row.get("step", 0)
        if row_step > step:
            continue
        if drop_eval and row_step == step and any(k.startswith("eval/") for k in row):
            continue
        keep.append(line if line.endswith("\n") else line + "\n")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(keep), encoding="utf-8")
    os.replace(tmp, path)
