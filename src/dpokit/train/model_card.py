"""The model card: output_dir/README.md at the end of a run, in the Hugging Face hub's format (YAML
front matter, then markdown), and the optional upload of output_dir to the hub (`push_to_hub`).

Front matter (https://huggingface.co/docs/hub/model-cards): `base_model` and `datasets` only where they
are hub names (the hub refuses other values; a local path is named in the body instead),
`library_name: transformers` (the directory is a plain `from_pretrained` one), `tags`: the command and
dpokit. The body: the loss and the key hyper-parameters, the final training and held-out metrics
(the last rows of metrics.jsonl), the training curves, and the command that repeats the run.
"""

import os
from pathlib import Path

import yaml

from dpokit.data.load import FILE_SUFFIXES
from dpokit.errors import UserError
from dpokit.io import atomic_write_text
from dpokit.losses import LOSSES
from dpokit.models import DEFAULT_NAME
from dpokit.report import fmt, log, read_metrics
from dpokit.train.callbacks import Callback

# the embedded `default` model is a GGUF copy of this hub model
DEFAULT_HUB_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"

# the keys the card lists under "Training", when the command's config has them
HYPERPARAMETERS = (
    "loss_type",
    "loss_weights",
    "beta",
    "label_smoothing",
    "reference_free",
    "learning_rate",
    "optimizer",
    "lr_scheduler",
    "warmup_steps",
    "weight_decay",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "num_train_epochs",
    "max_steps",
    "max_length",
    "max_prompt_length",
    "precision",
    "use_lora",
    "lora_r",
    "seed",
)


def command_of(cfg) -> str:
    """DPOConfig -> "dpo", SFTConfig -> "sft", RMConfig -> "rm", RLConfig -> "rl"."""
    return type(cfg).__name__.removesuffix("Config").lower() or "dpo"


def hub_name(name) -> str | None:
    """`name` when it can only be a hub repository id (not a local file or directory), else None."""
    if name in ("default", DEFAULT_NAME):
        return DEFAULT_HUB_NAME
    if not isinstance(name, str) or not name:
        return None
    path = Path(name).expanduser()
    if path.exists() or name.startswith((".", "/", "~")) or path.suffix in (*FILE_SUFFIXES, ".gguf"):
        return None
    if name.count("/") > 1 or any(c.isspace() for c in name) or "(" in name:  # e.g. "train_dataset (in memory)"
        return None
    return name


def _last(rows, evaluation: bool) -> dict:
    """The last training row (not a skipped step's) or the last held-out row, without the step."""
    for row in reversed(rows):
        if "skipped" in row or any(k.startswith("eval/") for k in row) != evaluation:
            continue
        return row
    return {}


def _value(v) -> str:
    """A config value as written in YAML: 1e-06, 0.25, sigmoid, a, b."""
    if isinstance(v, list):
        return ", ".join(map(_value, v))
    return f"{v:g}" if isinstance(v, float) else str(v)


def _table(row: dict) -> list:
    lines = ["| metric | value |", "| --- | --- |"]
    lines += [f"| {k} | {fmt(v)} |" for k, v in row.items() if k != "step"]
    return lines


def render_card(cfg, command: str, rows: list, steps: int, curves: bool) -> str:
    """The card's text: front matter and body, from the run's config and metrics rows."""
    base = hub_name(cfg.model)
    datasets = [d for d in dict.fromkeys([cfg.dataset, cfg.eval_dataset]) if hub_name(d)]
    meta = {}
    if base:
        meta["base_model"] = base
    meta["library_name"] = "transformers"
    meta["tags"] = [command, "dpokit"]
    if datasets:
        meta["datasets"] = datasets
    front = yaml.safe_dump(meta, sort_keys=False).strip()

    title = cfg.run_name or Path(cfg.output_dir).name
    lines = [f"---\n{front}\n---", "", f"# {title}", ""]
    lines.append(
        f"This model is `{cfg.model}` trained with `dpokit {command}` on `{cfg.dataset}` for {steps} optimizer steps."
    )
    lines += ["", "## Training", ""]
    for name in getattr(cfg, "loss_type", None) or []:
        spec = LOSSES.get(name)
        paper = f": {spec.paper}, loss = {spec.formula}" if spec is not None else ""
        lines.append(f"- loss `{name}`{paper}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    effective = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * world
    lines.append(
        f"- {effective} examples per optimizer step ({cfg.per_device_train_batch_size} per micro-batch x "
        f"{cfg.gradient_accumulation_steps} accumulated x {world} devices)"
    )
    lines += ["", "| key | value |", "| --- | --- |"]
    lines += [f"| {k} | {_value(getattr(cfg, k))} |" for k in HYPERPARAMETERS if getattr(cfg, k, None) is not None]

    train_row, eval_row = _last(rows, evaluation=False), _last(rows, evaluation=True)
    if train_row:
        lines += ["", f"## Final training metrics (step {train_row.get('step')})", "", *_table(train_row)]
    if eval_row:
        lines += ["", f"## Held-out metrics (step {eval_row.get('step')})", "", *_table(eval_row)]
    if curves:
        lines += ["", "## Training curves", "", "![training curves](training_curves.png)"]
    lines += [
        "",
        "## Reproduce",
        "",
        "`config.yaml` in this directory holds every key of the run:",
        "",
        "```bash",
        f"dpokit {command} --config config.yaml",
        "```",
        "",
    ]
    return "\n".join(lines)


def push_to_hub(output_dir, repo_id: str, api=None):
    """Upload output_dir to the hub repository `repo_id` (created if missing); checkpoints (optimizer
    state, resumable runs) and the run's lock file stay local. Any failure is one UserError line."""
    try:
        if api is None:
            from huggingface_hub import HfApi

            api = HfApi()
        api.create_repo(repo_id=repo_id, exist_ok=True)
        api.upload_folder(
            repo_id=repo_id,
            folder_path=str(output_dir),
            ignore_patterns=["checkpoint-*", "checkpoint-*/**", ".dpokit.lock", ".*"],
        )
    except Exception as e:  # no network, no token, no rights: the model is safe either way
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(
            f"the model is saved in {output_dir}, but the upload to the hub repository {repo_id} failed: "
            f"{type(e).__name__}: {reason}"
        ) from None
    log.info("uploaded %s to https://huggingface.co/%s", output_dir, repo_id)


class ModelCard(Callback):
    """At the end of the run (rank 0, after the final model is saved): output_dir/README.md, then,
    with push_to_hub, output_dir uploaded to hub_model_id."""

    def __init__(self, cfg, command: str | None = None):
        self.cfg, self.command = cfg, command or command_of(cfg)

    def on_train_end(self, state):
        out = Path(state.output_dir)
        metrics = out / "metrics.jsonl"
        rows = read_metrics(metrics) if metrics.is_file() else list(state.log_history)
        curves = (out / "training_curves.png").is_file()
        text = render_card(self.cfg, self.command, rows, state.step, curves)
        atomic_write_text(out / "README.md", text)
        if getattr(self.cfg, "push_to_hub", False):
            push_to_hub(out, self.cfg.hub_model_id)
