"""Reporters: the run's metrics rows, as metrics.jsonl has them, sent to an experiment tracker too
(the `report_to` key, TRL's name and values).

    tensorboard    event files under output_dir/runs/<run_name> (torch.utils.tensorboard's writer,
                   which needs the `tensorboard` package), one scalar per numeric key at the row's step
    wandb          wandb.log of the same rows at the same steps (the optional extra dpokit[wandb];
                   imported only when asked for; WANDB_MODE=offline works as wandb documents)

Both see training rows (`on_log`) and held-out rows (`on_evaluate`, keys `eval/...`); text values
(a skipped step's reason) and the step itself are not scalars and are left out.
"""

import math
import time
from pathlib import Path

from dpokit.errors import UserError
from dpokit.train.callbacks import Callback

REPORTERS = ("tensorboard", "wandb")


def reporters_for(report_to) -> list:
    """report_to's values -> the reporter names to run, in REPORTERS order ("all": both; "none": none;
    TrainConfig.check_reporting refused "none" beside others)."""
    wanted = set(report_to or ())
    return list(REPORTERS) if "all" in wanted else [name for name in REPORTERS if name in wanted]


def scalars(row: dict) -> dict:
    """The numeric values of a metrics row (bools and text left out), keyed as in metrics.jsonl."""
    return {
        k: float(v)
        for k, v in row.items()
        if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    }


def run_name_for(cfg) -> str:
    """`run_name`, or one that sorts by start time (TensorBoard's and TRL's default is alike)."""
    return cfg.run_name or time.strftime("%Y%m%d-%H%M%S")


class TensorBoard(Callback):
    """Every row's numeric values as scalars in output_dir/runs/<run_name>/events.out.tfevents.*."""

    def __init__(self, log_dir):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:  # torch's writer imports the tensorboard package
            raise UserError(
                f"report_to=tensorboard needs the tensorboard package (pip install tensorboard): {e}"
            ) from None
        self.writer = SummaryWriter(log_dir=str(log_dir))

    def _write(self, row):
        for key, value in scalars(row).items():
            self.writer.add_scalar(key, value, global_step=row["step"])
        self.writer.flush()  # a killed run keeps what it logged

    def on_log(self, state, metrics):
        self._write(metrics)

    def on_evaluate(self, state, metrics):
        self._write(metrics)

    def close(self):
        self.writer.close()


class WandB(Callback):
    """Every row's numeric values through wandb.log at the row's step; the run's config is the cfg."""

    def __init__(self, cfg, name: str):
        try:
            import wandb
        except ImportError:
            raise UserError("report_to=wandb needs the wandb package: pip install 'dpokit[wandb]'") from None
        from dpokit.config import to_dict

        try:  # wandb's own settings decide where it writes (WANDB_DIR, default ./wandb) and whether online
            self.run = wandb.init(name=name, config=to_dict(cfg))
        except Exception as e:  # not logged in, no network, a bad setting: wandb's reason, on one line
            raise UserError(
                f"report_to=wandb: wandb.init failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
            ) from None

    def _write(self, row):
        self.run.log(scalars(row), step=int(row["step"]))

    def on_log(self, state, metrics):
        self._write(metrics)

    def on_evaluate(self, state, metrics):
        self._write(metrics)

    def close(self):
        self.run.finish()


def build_reporters(cfg, output_dir) -> list:
    """The reporters `cfg.report_to` asks for (rank 0 only: the loop builds them there)."""
    names = reporters_for(getattr(cfg, "report_to", None))
    if not names:
        return []
    name = run_name_for(cfg)
    built = []
    try:
        if "tensorboard" in names:
            built.append(TensorBoard(Path(output_dir) / "runs" / name))
        if "wandb" in names:
            built.append(WandB(cfg, name))
    except UserError:
        for reporter in built:
            reporter.close()
        raise
    return built
