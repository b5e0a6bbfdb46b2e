"""What the user sees: a progress bar with ETA, metric lines on the console, metrics as JSON lines in
`output_dir/metrics.jsonl`, and a PNG plot of loss, reward accuracy and margins at the end."""

import json
import logging
import math
import os
import sys
from pathlib import Path

log = logging.getLogger("dpokit")


def setup_logging(verbose: bool = True):
    """Info on rank 0 only (under torchrun every process would repeat every line)."""
    verbose = verbose and os.environ.get("RANK", "0") == "0"
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s",
                        stream=sys.stderr)
    for noisy in ("transformers", "datasets", "httpx", "urllib3", "filelock", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:  # weight-loading and shard-writing bars would drown the training bar
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def fmt(v) -> str:
    if isinstance(v, float):
        if v == 0 or 1e-3 <= abs(v) < 1e5:
            return f"{v:.4f}"
        return f"{v:.3e}"
    return str(v)


class Reporter:
    """Console + JSON lines. Only rank 0 writes; other ranks get a silent Reporter."""

    def __init__(self, output_dir, total_steps: int, enabled: bool = True, progress_bar: bool = True, initial=0):
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self.bar = None
        if enabled and progress_bar:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=initial, desc="train", unit="step", dynamic_ncols=True, file=sys.stderr)
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.file = open(self.path, "a", encoding="utf-8")

    def step(self, n=1, **postfix):
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix({k: fmt(v) for k, v in postfix.items()}, refresh=False)

    def log(self, metrics: dict):
        if not self.enabled:
            return
        self.file.write(json.dumps(metrics) + "\n")  # one write and a flush per row: a kill tears at most
        self.file.flush()                             # the last line, which a resume drops
        line = " ".join(f"{k}={fmt(v)}" for k, v in metrics.items())
        if self.bar is not None:
            self.bar.write(line, file=sys.stderr)
        else:
            log.info(line)

    def sync(self):
        """fsync the rows written so far (before a checkpoint: the rows it vouches for are on disk)."""
        if self.enabled and not self.file.closed:
            self.file.flush()
            os.fsync(self.file.fileno())

    def close(self):
        if self.bar is not None:
            self.bar.close()
        if self.enabled:
            self.file.close()


def read_metrics(path) -> list:
    """The rows of a metrics.jsonl; a line that does not parse (torn by a kill) is left out, with a warning."""
    rows = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except ValueError:
                log.warning("%s: line %d is not JSON, left out", path, i)
    return rows


def plot_metrics(metrics_path, out_png, keys=("loss", "rewards/accuracies", "rewards/margins")):
    """One panel per key: training curve against step, evaluation points on top."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.6), squeeze=False)
    axes = axes[0]
    for ax, key in zip(axes, keys):
        train = [(r["step"], r[key]) for r in rows if key in r and math.isfinite(r[key])]
        evals = [(r["step"], r["eval/" + key]) for r in rows if "eval/" + key in r]
        if train:
            ax.plot(*zip(*train), label="train", color="tab:blue")
        if evals:
            ax.plot(*zip(*evals), "o-", label="eval", color="tab:orange")
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if train or evals:
            ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
