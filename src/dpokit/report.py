"""Logging set-up, number formatting, and reading and plotting metrics.jsonl. (What writes them during
training, the progress bar and console lines included, is train/callbacks.py.)"""

import json
import logging
import math
import os
import sys

log = logging.getLogger("dpokit")


def setup_logging(verbose: bool = True):
    """Info on rank 0 only (under torchrun every process would repeat every line)."""
    verbose = verbose and os.environ.get("RANK", "0") == "0"
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s", stream=sys.stderr)
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
