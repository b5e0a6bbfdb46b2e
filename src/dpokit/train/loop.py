"""The one training loop every stage shares. A stage supplies a *step*: a callable

    step(model, batch) -> (losses (B,), metrics {name: (B,) tensor})

returning per-example losses and per-example metrics; the loop does everything else: data order
(train/order.py), gradient accumulation, mixed precision and devices (train/runtime.py), clipping,
optimizer and schedule (train/optim.py), evaluation, metrics (train/metrics.py), checkpoints and
resume (train/checkpoint.py), the output_dir lock (train/lock.py), and what watches the run
(train/callbacks.py: progress bar, metrics.jsonl, plots, yours).

Gradient accumulation weights every example equally, so k micro-batches of b examples give the
gradient of one batch of k*b examples (the per-step loss is sum(losses) / examples-in-the-step).
"""

import math
import os
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from dpokit.config import save_config, to_dict
from dpokit.errors import Interrupted, UserError
from dpokit.report import log, read_metrics
from dpokit.train import checkpoint, order, parallel
from dpokit.train.callbacks import CallbackList, MetricsFile, Plot, Progress, TrainState
from dpokit.train.checkpoint import fault_point
from dpokit.train.lock import RunLock, check_free
from dpokit.train.metrics import MetricSums, truncate_metrics
from dpokit.train.model_card import ModelCard
from dpokit.train.optim import build_optimizer, lr_lambda
from dpokit.train.reporters import build_reporters
from dpokit.train.runtime import Ranks, all_finite, all_reduce_sum, autocast, peak_memory_mb, set_seed, to_device


@dataclass
class TrainResult:
    """What a training command returns: the trained model in memory (a LoRA model merged), the rows of
    metrics.jsonl this run logged, and where the model was saved."""

    model: object
    metrics: list
    output_dir: Path
    stopped_early: bool = False


def forward_backward(model, step, micro_batches: list, ranks: Ranks, precision: str, sums: "MetricSums") -> int:
    """Accumulate the gradient of one optimizer step over its micro-batches; returns tokens processed.

    Each micro-batch's loss is sum(losses) / (examples in the whole step), so the accumulated gradient
    is that of the mean loss over the step's examples, whatever the micro-batch sizes. Under DDP only
    the last micro-batch all-reduces gradients; under fsdp every micro-batch reduce-scatters its own.
    Both average over ranks, so the examples are counted over every rank and the loss scaled by the
    world size: each pair weighs the same whatever its rank's share (token-budget batches give ranks
    different numbers of pairs).
    """
    n_step = sum(b["num_examples"] for b in micro_batches)
    if ranks.world > 1:
        n_step = all_reduce_sum(torch.tensor([float(n_step)])).item() / ranks.world
    tokens = 0
    for i, batch in enumerate(micro_batches):
        batch = to_device(batch, ranks.device)
        tokens += int(batch["num_tokens"])
        with parallel.no_sync(model, last=i == len(micro_batches) - 1), autocast(ranks.device, precision):
            losses, metrics = step(model, batch)
            loss = losses.sum() / n_step
        loss.backward()
        sums.add({"loss": losses, **metrics}, batch["num_examples"])
    return tokens


@torch.no_grad()
def evaluate(model, step, collate, examples, cfg, ranks: Ranks) -> dict:
    """Example-weighted means of the step's metrics over held-out data, prefixed `eval/`."""
    was_training = model.training
    model.eval()
    sums = MetricSums()
    mine = list(range(len(examples)))[ranks.rank :: ranks.world]
    bs = cfg.per_device_eval_batch_size
    # a sharded model's forward is collective, and so is DDP's (it broadcasts buffers, e.g. the rotary
    # inv_freq): every rank runs as many batches as rank 0 (which has the most), a rank that has run out
    # repeating one example and counting nothing of it (an uneven split would otherwise hang)
    n_batches = math.ceil(math.ceil(len(examples) / ranks.world) / bs) if ranks.world > 1 else 0
    for i in range(0, max(len(mine), n_batches * bs), bs):
        chunk = [examples[j] for j in mine[i : i + bs]]
        batch = to_device(collate(chunk or examples[:1]), ranks.device)
        with autocast(ranks.device, cfg.precision):
            losses, metrics = step(model, batch)
        if chunk:
            sums.add({"loss": losses, **metrics}, len(chunk))
        else:  # the same keys with nothing counted, so that every rank's all-reduce has the same shape
            values = {k: v[0] if isinstance(v, tuple) else v for k, v in {"loss": losses, **metrics}.items()}
            sums.add({k: (v, torch.zeros_like(v)) for k, v in values.items()}, 0)
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
            raise UserError(
                f"{cfg.output_dir}: only {free / 2**30:.2f} GiB free, a checkpoint needs about {need / 2**30:.2f} GiB"
            )


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


def train(
    cfg, model, step, train_examples, eval_examples, collate, ranks: Ranks, save_fn=None, callbacks=(), plot_keys=()
) -> TrainResult:
    """Run the optimisation described by `cfg`; checkpoint every save_steps and at the end; save the
    final model to cfg.output_dir (rank 0). Resumes from a checkpoint when cfg.resume says so.
    `callbacks` watch the run (train/callbacks.py); rank 0 adds the progress bar, metrics.jsonl and,
    with `plot_keys`, training_curves.png.

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
        return _train(cfg, model, step, train_examples, eval_examples, collate, ranks, save_fn, callbacks, plot_keys)
    finally:
        lock.release()
        if created and ranks.main and out.is_dir() and not any(out.iterdir()):
            out.rmdir()


def _train(cfg, model, step, train_examples, eval_examples, collate, ranks: Ranks, save_fn, callbacks, plot_keys):
    out = Path(cfg.output_dir)
    set_seed(cfg.seed)
    model.to(ranks.device)
    model.train()
    raw_model = model
    model = parallel.wrap(model, cfg, ranks)  # itself, in DDP, or sharded in place (fsdp)
    parallel.shard_frozen(step, cfg, ranks)
    sharded = parallel.is_sharded(raw_model)
    moving = step.moving_models() if hasattr(step, "moving_models") else {}  # (TR-DPO's reference)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(cfg, model)  # (param groups: per-module learning rates, train/optim.py)
    per_epoch = order.per_epoch(cfg, train_examples, ranks)
    total = (
        cfg.max_steps
        if cfg.max_steps > 0
        else max(1, math.ceil(cfg.num_train_epochs * per_epoch / cfg.gradient_accumulation_steps))
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total))

    window, window_tokens, grad_norms, start_step = MetricSums(), 0, [], 0
    window_t0 = time.perf_counter()
    resume_from = checkpoint.find_resume(cfg.resume, out)
    if resume_from is not None:
        dcp = parallel.is_dcp_checkpoint(resume_from)
        load = None  # an unsharded run's own checkpoint: checkpoint.py reads it
        if dcp:
            load = lambda p: parallel.load_dcp(p / parallel.DCP_DIR, raw_model, optimizer, moving)  # noqa: E731
        elif sharded:
            load = lambda p: parallel.load_unsharded_checkpoint(p, raw_model, optimizer, moving)  # noqa: E731
        state = checkpoint.load_checkpoint(resume_from, raw_model, optimizer, load)
        checkpoint.check_resumable(cfg, state, resume_from, ranks.world)
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
    builtin = []
    if ranks.main:  # the model card comes last: it reads the plot, and push_to_hub uploads everything
        builtin = [Progress(cfg.progress_bar), MetricsFile(out / "metrics.jsonl"), Plot(plot_keys)]
        builtin += [*build_reporters(cfg, out), ModelCard(cfg)]
    cbs = CallbackList([*builtin, *callbacks])
    state = TrainState(step=start_step, total_steps=total, output_dir=out, is_main=ranks.main, model=raw_model)
    log.info(
        "training: %d examples, %d optimizer steps of %d x %d x %d examples, %d held-out examples",
        len(train_examples),
        total,
        cfg.per_device_train_batch_size,
        cfg.gradient_accumulation_steps,
        ranks.world,
        len(eval_examples or []),
    )

    def run_eval(step_no):
        if eval_examples:
            cbs.on_evaluate(state, {"step": step_no, **evaluate(model, step, collate, eval_examples, cfg, ranks)})

    def save_checkpoint(step_no):
        saved = {
            "scheduler": scheduler.state_dict(),
            "micro_batches": step_no * cfg.gradient_accumulation_steps,
            "window": window.state(),
            "window_tokens": window_tokens,
            "grad_norms": grad_norms,
            "config": to_dict(cfg),
            "step_state": step.state_dict() if hasattr(step, "state_dict") else {},
            "world": ranks.world,
        }
        if not all_finite(raw_model.parameters()):  # (never: every step checks; a checkpoint must not be the first)
            raise UserError(f"step {step_no}: refusing to save a checkpoint of non-finite weights")

        def write(directory):
            save_fn(raw_model, directory)
            if hasattr(step, "save_state"):
                step.save_state(directory)

        path = None
        if sharded and save_fn:  # every rank writes its shards; rank 0 the rest

            def write_model(directory, state_dict):
                save_fn(raw_model, directory, state_dict=state_dict)
                if hasattr(step, "save_state"):
                    step.save_state(directory)

            path = parallel.save_sharded(
                out, step_no, raw_model, optimizer, saved, write_model, moving, cfg.save_total_limit, ranks
            )
        elif ranks.main and save_fn:
            path = checkpoint.save_checkpoint(out, step_no, write, optimizer, saved, cfg.save_total_limit)
        if dist.is_initialized():
            dist.barrier()
        if path is not None:
            cbs.on_save(state, path)
        return path

    def log_window(step_no, lr):
        """The means of the steps since the last row, as one row (nothing when there are none)."""
        nonlocal window, window_tokens, window_t0, grad_norms
        if not window.count:
            return
        elapsed = time.perf_counter() - window_t0
        tokens_all = all_reduce_sum(torch.tensor(float(window_tokens))).item()
        cbs.on_log(
            state,
            {
                "step": step_no,
                "epoch": round(step_no * cfg.gradient_accumulation_steps / per_epoch, 4),
                **window.means(),
                "grad_norm": sum(grad_norms) / max(1, len(grad_norms)),
                "learning_rate": lr,
                "tokens_per_second": tokens_all / elapsed,
                "peak_memory_mb": peak_memory_mb(ranks.device),
            },
        )
        window, window_tokens, window_t0, grad_norms = MetricSums(), 0, time.perf_counter(), []

    def stop_requested() -> bool:
        """A callback's request to stop, agreed by every rank (any rank may ask)."""
        wanted = float(state.should_stop)
        return (all_reduce_sum(torch.tensor([wanted])).item() if ranks.world > 1 else wanted) > 0

    try:
        cbs.on_train_begin(state)
        if start_step == 0:
            run_eval(0)
        stream = order.stream(cfg, train_examples, ranks, start=start_step * cfg.gradient_accumulation_steps)
        nonfinite, end = 0, total
        with StopSignal() as stop:
            for step_no in range(start_step + 1, total + 1):
                micro = [
                    collate([train_examples[j] for j in idx])
                    for idx in (next(stream) for _ in range(cfg.gradient_accumulation_steps))
                ]
                step_sums = MetricSums()
                tokens = forward_backward(model, step, micro, ranks, cfg.precision, step_sums)
                clip = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
                grad_norm = parallel.clip_grad_norm(params, clip)
                step_loss = step_sums.means().get("loss", 0.0)
                lr = scheduler.get_last_lr()[0]  # the rate this step uses
                if math.isfinite(grad_norm) and math.isfinite(step_loss):
                    optimizer.step()
                    if not all_finite(params):  # finite gradients, yet e.g. a huge learning_rate overflowed
                        last = checkpoint.list_checkpoints(out)
                        raise UserError(
                            f"stopped at step {step_no}: the optimizer step made the weights non-finite "
                            f"(lower learning_rate); nothing of this step was saved; last good "
                            f"checkpoint: {last[-1] if last else 'none'}"
                        )
                    if hasattr(step, "after_optimizer_step"):
                        step.after_optimizer_step(step_no, raw_model)
                    nonfinite = 0
                    window.merge(step_sums)
                    window_tokens += tokens
                    grad_norms.append(grad_norm)
                else:  # skip the update, keep the schedule moving so a resumed run stays in step
                    nonfinite += 1
                    cbs.on_log(
                        state,
                        {
                            "step": step_no,
                            "skipped": "non-finite loss or gradient",
                            "loss": step_loss,
                            "grad_norm": grad_norm,
                        },
                    )
                    if nonfinite >= cfg.max_nonfinite_steps:
                        last = checkpoint.list_checkpoints(out)
                        raise UserError(
                            f"stopped at step {step_no}: {nonfinite} steps in a row with a non-finite "
                            f"loss or gradient (lower learning_rate or use fp32); last good checkpoint: "
                            f"{last[-1] if last else 'none'}"
                        )
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                fault_point(f"step:{step_no}")
                state.step = step_no
                if step_no % cfg.logging_steps == 0 or step_no == total:
                    log_window(step_no, lr)
                cbs.on_step_end(state)
                if step_no != total and stop_requested():  # a callback ends the run here, as a normal end would
                    log_window(step_no, lr)
                    state.stopped_early, end = True, step_no
                    log.info("a callback stopped the run at step %d of %d", step_no, total)
                    break
                t0 = time.perf_counter()
                if cfg.eval_steps and step_no % cfg.eval_steps == 0 and step_no != total:
                    run_eval(step_no)
                if cfg.save_steps and step_no % cfg.save_steps == 0 and step_no != total and not nonfinite:
                    save_checkpoint(step_no)  # never in a run of non-finite steps: the last good one stays newest
                window_t0 += time.perf_counter() - t0  # evaluation and saving are not training throughput
                if stop.received and step_no != total:
                    raise Interrupted(stop.received, save_checkpoint(step_no))
            # a first signal from here on just lets the run finish; a second still stops at once
            run_eval(end)
            last = save_checkpoint(end)
            if save_fn and not all_finite(raw_model.parameters()):
                raise UserError(f"refusing to save non-finite weights to {out}")
            # fsdp: the whole weights gathered to rank 0, tensor by tensor (every rank takes part)
            extra = {"state_dict": parallel.full_state_dict(raw_model, ranks.main)} if sharded and save_fn else {}
            if ranks.main and save_fn:
                saved_model = checkpoint.save_final(out, lambda d: save_fn(raw_model, d, final=True, **extra), last)
                raw_model = saved_model if not sharded and saved_model is not None else raw_model
                state.model = raw_model  # (a LoRA model comes back merged; a sharded one stays as it is)
            cbs.on_train_end(state)
    finally:
        cbs.close()
    rows = read_metrics(out / "metrics.jsonl") if ranks.main else state.log_history  # (with a resumed run's)
    return TrainResult(raw_model, rows, out, state.stopped_early)
