"""Callbacks: what watches a run, and may stop it. The progress bar, the console lines, metrics.jsonl and
the training-curve plot are callbacks themselves (rank 0 only); yours run on every rank.

Subclass `Callback` and override any of

    on_train_begin(state)          the run is set up (resumed, if it was), before its first step
    on_step_end(state)             after each optimizer step
    on_log(state, metrics)         a row of training metrics (window means, or a skipped step)
    on_evaluate(state, metrics)    held-out metrics, keys `eval/...`
    on_save(state, path)           a checkpoint was written to `path`
    on_train_end(state)            the final model is saved

Set `state.should_stop = True` in any hook to end the run after the current step: the loop then
evaluates, writes a checkpoint and saves the model, as at a normal end (`state.stopped_early` says so).
"""

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from dpokit.report import fmt, log, plot_metrics


@dataclass
class TrainState:
    """What a callback sees. `model` is the model being trained (unwrapped from DDP)."""

    step: int
    total_steps: int
    output_dir: Path
    is_main: bool = True
    model: object = None
    should_stop: bool = False
    stopped_early: bool = False
    log_history: list = field(default_factory=list)  # every row logged in this process, in order


class Callback:
    """Base class: every hook does nothing."""

    def on_train_begin(self, state: TrainState):
        pass

    def on_step_end(self, state: TrainState):
        pass

    def on_log(self, state: TrainState, metrics: dict):
        pass

    def on_evaluate(self, state: TrainState, metrics: dict):
        pass

    def on_save(self, state: TrainState, path: Path):
        pass

    def on_train_end(self, state: TrainState):
        pass

    def close(self):
        """Always called last, also when the run fails or is interrupted (release files, bars)."""


class CallbackList(Callback):
    """Calls each hook on every callback in order."""

    def __init__(self, callbacks):
        self.callbacks = list(callbacks)

    def _call(self, name, *args):
        for cb in self.callbacks:
            getattr(cb, name)(*args)

    def on_train_begin(self, state):
        self._call("on_train_begin", state)

    def on_step_end(self, state):
        self._call("on_step_end", state)

    def on_log(self, state, metrics):
        state.log_history.append(metrics)
        self._call("on_log", state, metrics)

    def on_evaluate(self, state, metrics):
        state.log_history.append(metrics)
        self._call("on_evaluate", state, metrics)

    def on_save(self, state, path):
        self._call("on_save", state, path)

    def on_train_end(self, state):
        self._call("on_train_end", state)

    def close(self):
        for cb in self.callbacks:
            try:
                cb.close()
            except Exception as e:  # closing must not hide the error that brought us here
                log.warning("callback %s failed to close: %s", type(cb).__name__, e)


class MetricsFile(Callback):
    """Each logged row as one JSON line in output_dir/metrics.jsonl: one write, flushed and fsynced, so
    a kill leaves at most a torn last line (which resume drops) and a checkpoint never runs ahead of
    the rows before it."""

    def __init__(self, path):
        self.path, self.file = Path(path), None

    def _write(self, row):
        if self.file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.file = open(self.path, "a", encoding="utf-8")
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        os.fsync(self.file.fileno())

    def on_log(self, state, metrics):
        self._write(metrics)

    def on_evaluate(self, state, metrics):
        self._write(metrics)

    def close(self):
        if self.file is not None:
            self.file.close()
            self.file = None


# what the progress bar shows beside the step count, from a training row
SHOWN = ("loss", "rewards/accuracies", "accuracy", "reward")


class Progress(Callback):
    """A progress bar with ETA (tqdm, on stderr) and each logged row as one console line."""

    def __init__(self, enabled: bool = True):
        self.enabled, self.bar = enabled, None

    def on_train_begin(self, state):
        if self.enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=state.total_steps,
                initial=state.step,
                desc="train",
                unit="step",
                dynamic_ncols=True,
                file=sys.stderr,
            )

    def on_step_end(self, state):
        if self.bar is not None:
            self.bar.update(state.step - self.bar.n)

    def _line(self, metrics):
        line = " ".join(f"{k}={fmt(v)}" for k, v in metrics.items())
        if self.bar is not None:
            self.bar.write(line, file=sys.stderr)
        else:
            log.info(line)

    def on_log(self, state, metrics):
        self._line(metrics)
        shown = {k.split("/")[-1]: fmt(metrics[k]) for k in SHOWN if k in metrics}
        if self.bar is not None and shown:
            self.bar.set_postfix(shown, refresh=False)

    def on_evaluate(self, state, metrics):
        self._line(metrics)

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class Plot(Callback):
    """output_dir/training_curves.png at the end: one panel per key, training and held-out curves."""

    def __init__(self, keys):
        self.keys = tuple(keys)

    def on_train_end(self, state):
        metrics = Path(state.output_dir) / "metrics.jsonl"
        if self.keys and metrics.is_file():
            plot_metrics(metrics, Path(state.output_dir) / "training_curves.png", self.keys)
