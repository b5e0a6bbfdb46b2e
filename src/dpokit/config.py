"""Configuration: dataclasses with defaults and help text, read from YAML plus `key=value` overrides.

Every field's help text feeds `dpokit <command> --help`. Names follow TRL's DPOConfig where the
concept is the same (beta, label_smoothing, max_length, max_prompt_length, truncation_mode, ...).
An unknown key or a bad value is a UserError naming the key and what is valid.
"""

import dataclasses
import difflib
import importlib.util
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from dpokit import trl_keys
from dpokit.errors import UserError


def opt(default, help: str, choices=None, **kw):
    """A config field with its help text (and, for strings or lists of strings, the valid choices)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, "choices": choices}, **kw)
    return field(default=default, metadata={"help": help, "choices": choices}, **kw)


# dpokit.precision.PRECISIONS (kept here so that config answers without importing torch; a test keeps
# the two lists equal)
PRECISIONS = ["auto", "fp32", "bf16"]
# how the model is spread over torchrun's processes (train/parallel.py)
PARALLELISMS = ["ddp", "fsdp"]
# report_to's values, as TRL's (dpokit.train.reporters.REPORTERS has the two that are reporters)
REPORT_TO = ["none", "all", "tensorboard", "wandb"]


@dataclass
class TrainConfig:
    """What every training stage shares: model, data, optimisation, logging and saving."""

    # --- model and data
    model: str = opt(
        "default",
        "policy to train: a HF model directory, a hub name, a .gguf file, or "
        "'default' for the embedded SmolLM2-135M-Instruct",
    )
    dataset: str = opt(None, "training data: a .jsonl/.json/.parquet/.csv file, a `datasets` directory, or a hub name")
    dataset_train_split: str = opt("train", "split of `dataset` to train on (for `datasets` names and directories)")
    eval_dataset: typing.Optional[str] = opt(
        None, "held-out data (file or name); default: the `dataset_test_split` split of `dataset` when it has one"
    )
    dataset_test_split: str = opt("test", "split of `dataset` (or `eval_dataset`) to evaluate on")
    max_eval_examples: typing.Optional[int] = opt(None, "evaluate on at most this many held-out examples")
    output_dir: str = opt("runs/dpo", "where the trained model, config, metrics and plots are written")
    trust_remote_code: bool = opt(False, "allow model repositories to run their own code (off unless you trust them)")
    # --- tokenization
    max_length: typing.Optional[int] = opt(
        1024, "maximum tokens of prompt + response; longer responses are cut at the end (and lose their EOS)"
    )
    max_prompt_length: typing.Optional[int] = opt(
        512, "maximum prompt tokens; longer prompts are cut per truncation_mode"
    )
    truncation_mode: str = opt("keep_end", "which part of a too-long prompt to keep", ["keep_end", "keep_start"])
    dataset_num_proc: typing.Optional[int] = opt(
        None, "processes that tokenize the data (default: the CPU cores, one per 2,000 rows at most)"
    )
    cache_tokenized: bool = opt(
        True,
        "keep tokenized pairs in $DPOKIT_CACHE/tokenized under a fingerprint of data, tokenizer and length "
        "settings; a later run on the same inputs skips tokenization",
    )
    # --- optimisation
    learning_rate: float = opt(1e-6, "peak learning rate")
    optimizer: str = opt("adamw", "optimizer (the DPO paper used RMSprop)", ["adamw", "rmsprop"])
    adam_beta1: float = opt(0.9, "AdamW's beta1 (decay of the gradient's running mean)")
    adam_beta2: float = opt(0.999, "AdamW's beta2 (decay of the squared gradient's running mean)")
    adam_epsilon: float = opt(1e-8, "AdamW's epsilon (added to the root of the second moment)")
    weight_decay: float = opt(0.0, "decoupled weight decay (AdamW) / L2 (RMSprop)")
    warmup_steps: int = opt(0, "linear warmup from 0 to learning_rate over this many optimizer steps")
    lr_scheduler: str = opt("linear", "learning-rate schedule after warmup", ["constant", "linear", "cosine"])
    per_device_train_batch_size: int = opt(8, "examples (pairs) per micro-batch on each device")
    per_device_eval_batch_size: int = opt(8, "examples per evaluation batch on each device")
    gradient_accumulation_steps: int = opt(1, "micro-batches per optimizer step; the step equals one larger batch")
    num_train_epochs: float = opt(1.0, "passes over the training data (fractions allowed); ignored if max_steps > 0")
    max_steps: int = opt(-1, "optimizer steps to run; -1 means use num_train_epochs")
    max_grad_norm: float = opt(1.0, "clip the global gradient norm to this (0 disables clipping)")
    precision: str = opt(
        "auto",
        "auto: bf16 where the device computes it natively (CUDA with bf16, CPUs with "
        "avx512_bf16 / amx_bf16), else fp32; or fp32; or bf16 autocast with fp32 master "
        "weights",
        PRECISIONS,
    )
    disable_dropout: bool = opt(True, "turn off dropout in the policy (and reference) so log-probs are deterministic")
    padding_free: bool = opt(
        False, "pack the batch's sequences into one row (no padding computed), attention kept within each sequence"
    )
    prefix_sharing: bool = opt(
        False,
        "one [prompt | chosen | rejected] sequence per pair: the prompt is computed "
        "once (needs attn_implementation sdpa or eager)",
    )
    logprob_chunk_size: typing.Optional[int] = opt(
        None,
        "compute response-token log-probs in chunks of this many "
        "tokens (the full tokens x vocabulary logits never exist); 0: picked from the vocabulary size; "
        "null: off",
    )
    gradient_checkpointing: bool = opt(
        False,
        "recompute activations in the backward pass: less memory, ~30% more "
        "compute (off by default: turn on when memory runs out)",
    )
    parallelism: str = opt(
        "ddp",
        "under torchrun: ddp (a whole copy of model, gradients and optimizer on every process) or fsdp "
        "(PyTorch FSDP2: each decoder layer and the root sharded across processes, the reference too; "
        "sharded DCP checkpoints); see docs/distributed.md",
        PARALLELISMS,
    )
    fsdp_cpu_offload: bool = opt(
        False, "fsdp: keep the sharded parameters, gradients and optimizer state in CPU memory (CPUOffloadPolicy)"
    )
    fsdp_reshard_after_forward: bool = opt(
        True,
        "fsdp: free each layer's gathered parameters after its forward (gather again for the backward): "
        "less memory, one more all-gather per layer",
    )
    use_lora: bool = opt(False, "train LoRA adapters (peft) instead of all weights; merged into a plain model on save")
    lora_r: int = opt(16, "LoRA rank")
    lora_alpha: float = opt(32.0, "LoRA scaling alpha (the update is scaled by alpha / r)")
    lora_dropout: float = opt(0.0, "dropout on the LoRA input")
    lora_target_modules: typing.List[str] = opt(
        ["all-linear"], "modules that get adapters: names such as q_proj,v_proj, or all-linear"
    )
    seed: int = opt(42, "seed for model init, data order and sampling; the same seed repeats the run")
    # --- logging, evaluation, saving
    logging_steps: int = opt(10, "log metrics every this many optimizer steps")
    eval_steps: int = opt(0, "evaluate every this many steps (0: only before and after training)")
    save_steps: int = opt(0, "write a checkpoint every this many steps (0: only at the end)")
    save_total_limit: typing.Optional[int] = opt(None, "keep only the newest N checkpoints (none: keep all)")
    resume: typing.Optional[str] = opt(
        None,
        "'auto': continue from the newest complete checkpoint in output_dir "
        "(or start fresh if none); or a checkpoint directory",
    )
    max_nonfinite_steps: int = opt(
        3,
        "stop after this many optimizer steps in a row with a non-finite loss or gradient (each such step is skipped)",
    )
    progress_bar: bool = opt(True, "show a progress bar with ETA on the console")
    report_to: typing.Optional[typing.List[str]] = opt(
        None,
        "also log every metrics row to these (train/reporters.py): tensorboard (event files in "
        "output_dir/runs/), wandb (pip install dpokit[wandb]); all: both; none: neither",
        REPORT_TO,
    )
    run_name: typing.Optional[str] = opt(None, "the run's name in wandb and its tensorboard subdirectory")
    push_to_hub: bool = opt(False, "upload output_dir (model, model card, metrics) to the hub at the end")
    hub_model_id: typing.Optional[str] = opt(None, "the hub repository push_to_hub uploads to, e.g. user/my-dpo-model")

    def check_reporting(self):
        """report_to's and push_to_hub's rules (validate() calls this: the commands' own `check` methods
        do not chain up). A missing reporter package is found here, before anything is written."""
        wanted = set(self.report_to or ())
        if "none" in wanted and len(wanted) > 1:
            others = ", ".join(sorted(wanted - {"none"}))
            raise UserError(f"key 'report_to': 'none' cannot be combined with {others}")
        for name, hint in (("tensorboard", "pip install tensorboard"), ("wandb", "pip install 'dpokit[wandb]'")):
            if (name in wanted or "all" in wanted) and importlib.util.find_spec(name) is None:
                raise UserError(f"key 'report_to': {name} needs the {name} package ({hint})")
        if self.push_to_hub and not self.hub_model_id:
            raise UserError("key 'push_to_hub': needs hub_model_id (the repository to upload to, e.g. user/name)")


# ---------------------------------------------------------------------------------------------------


def fields_of(cls):
    hints = typing.get_type_hints(cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls)]


def _base_type(tp):
    """Optional[int] -> (int, True)."""
    if typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def _list_of(tp):
    """List[float] -> float; anything else -> None."""
    return typing.get_args(tp)[0] if typing.get_origin(tp) is list else None


def coerce(key: str, value, tp, choices=None, source: str = ""):
    """Turn a YAML / command-line value into the field's type, or raise a UserError naming the key."""
    base, optional = _base_type(tp)
    where = f"{source}: " if source else ""
    item = _list_of(base)
    if item is not None and value is not None:  # a YAML list, or "a,b" (or "[a, b]") on the command line
        if isinstance(value, list):
            values = value
        else:
            text = str(value).strip()
            if text.startswith("[") and text.endswith("]"):
                text = text[1:-1]
            values = [v.strip().strip("'\"") for v in text.split(",") if v.strip().strip("'\"")]
        if not values:
            raise UserError(f"{where}key '{key}' needs at least one value")
        return [coerce(key, v, item, choices, source) for v in values]
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null", "")):
        if optional or base is str and value is None:
            return None
        raise UserError(f"{where}key '{key}' needs a value of type {base.__name__}")
    if isinstance(value, (dict, list)):  # a nested YAML value where the key takes one scalar
        raise UserError(f"{where}key '{key}': expected a single {base.__name__}, got a {type(value).__name__}")
    try:
        if base is bool:
            if isinstance(value, bool):
                out = value
            elif str(value).lower() in ("true", "1", "yes", "on"):
                out = True
            elif str(value).lower() in ("false", "0", "no", "off"):
                out = False
            else:
                raise ValueError
        elif base is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            out = int(value) if not isinstance(value, str) else int(value.strip())
            if not -(2**63) <= out < 2**63:  # every integer key ends up in a 64-bit tensor or C call
                raise UserError(f"{where}key '{key}': {out} is out of range")
        elif base is float:
            if isinstance(value, bool):
                raise ValueError
            out = float(value)
            if not math.isfinite(out):  # nan and inf would train silently wrong (or not at all)
                raise UserError(f"{where}key '{key}': must be a finite number, got {value!r}")
        else:
            out = str(value)
    except UserError:
        raise
    except (TypeError, ValueError, OverflowError):
        raise UserError(f"{where}key '{key}': {_short(value)} is not a valid {base.__name__}") from None
    if choices and out not in choices:
        raise UserError(f"{where}key '{key}': {out!r} is not one of {', '.join(choices)}")
    return out


def _short(value, limit: int = 60) -> str:
    """repr of a value, cut so that an error stays one readable line."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _unknown(key, cls, source):
    names = [f.name for f in dataclasses.fields(cls)]
    close = difflib.get_close_matches(key, names, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    where = f"{source}: " if source else ""
    return UserError(f"{where}unknown key '{key}'{hint}; valid keys: {', '.join(names)}")


def load_config(cls, config_file=None, overrides=(), values=None, source="config", validate_now=True):
    """Defaults <- `values` (a dict of keys, from Python) <- YAML file <- `key=value` overrides, each value
    checked against its field; then the whole config is validated (unless validate_now is false)."""
    given, values = values or {}, {}
    for k, v in given.items():
        if not isinstance(k, str):
            raise UserError(f"{source}: key {_short(k)} is not a name (keys are strings such as 'beta')")
        values[k] = (v, source)
    if config_file:
        path = Path(config_file)
        if not path.is_file():
            raise UserError(f"{path}: config file not found")
        data = read_yaml(path) or {}
        if not isinstance(data, dict):
            raise UserError(f"{path}: expected a mapping of key: value")
        for k, v in data.items():
            if not isinstance(k, str):
                raise UserError(f"{path}: key {_short(k)} is not a name (keys are strings such as 'beta')")
            values[k] = (v, str(path))
    if getattr(cls, "accepts_trl_keys", False):  # a TRL DPO YAML (or dict) works unchanged: docs/trl.md
        values = trl_keys.translate(values, cls)
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override '{item}' is not key=value")
        k, v = item.split("=", 1)
        # the value stays a string: coerce() converts it by the key's type, so a path holding ' #' or ': '
        # reaches the key as typed (YAML would cut a comment or read a mapping)
        values[k.strip()] = (v if v.strip() else None, "command line")
    known = {f.name: (f, tp) for f, tp in fields_of(cls)}
    kwargs = {}
    for k, (v, source) in values.items():
        if k not in known:
            raise _unknown(k, cls, source)
        f, tp = known[k]
        kwargs[k] = coerce(k, v, tp, f.metadata.get("choices"), source)
    cfg = cls(**kwargs)
    if validate_now:
        validate(cfg)
    return cfg


def resolve_config(cls, config, **stand_ins):
    """The Python API's `config` argument as a validated `cls`: an instance of it, a dict of its keys, a
    YAML path, or None (the defaults), checked exactly as the command line checks its keys. `stand_ins`
    (key -> value, None skipped) replace keys whose object the caller passed directly, before validation."""
    if isinstance(config, cls):
        cfg = load_config(cls, None, values=dataclasses.asdict(config), source="config", validate_now=False)
    elif isinstance(config, dict):
        cfg = load_config(cls, None, values=config, source="config", validate_now=False)
    elif isinstance(config, str) or hasattr(config, "__fspath__"):
        cfg = load_config(cls, config, validate_now=False)
    elif config is None:
        cfg = load_config(cls, None, validate_now=False)
    else:
        raise UserError(
            f"config: expected a {cls.__name__}, a dict of keys or a YAML path, got {type(config).__name__}"
        )
    known = {f.name for f in dataclasses.fields(cls)}
    cfg = dataclasses.replace(cfg, **{k: v for k, v in stand_ins.items() if v is not None and k in known})
    validate(cfg)
    return cfg


def in_memory_name(obj, what=None):
    """What a config key records for an object passed in its place: a path stays itself; a dataset is
    "<what> (in memory)"; a model its name_or_path."""
    if obj is None or isinstance(obj, str):
        return obj
    if what is not None:
        return f"{what} (in memory)"
    return getattr(obj, "name_or_path", None) or f"<{type(obj).__name__} in memory>"


def read_yaml(path: Path):
    """A YAML config file's contents (None when empty), or a UserError naming the file."""
    try:
        text = path.read_bytes().decode("utf-8-sig")  # tolerate a byte-order mark
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not valid UTF-8 (byte {e.start})") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read config file ({e.strerror or e})") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    except RecursionError:
        raise UserError(f"{path}: not valid YAML (nested too deeply)") from None


def validate(cfg):
    """Range checks that types alone cannot express."""
    positive = [
        "per_device_train_batch_size",
        "per_device_eval_batch_size",
        "gradient_accumulation_steps",
        "logging_steps",
        "num_samples",
        "max_new_tokens",
        "max_nonfinite_steps",
        "save_total_limit",
        "lora_r",
        "dataset_num_proc",
    ]
    for name in positive:
        if getattr(cfg, name, None) is not None and getattr(cfg, name) < 1:
            raise UserError(f"key '{name}': must be at least 1, got {getattr(cfg, name)}")
    if getattr(cfg, "logprob_chunk_size", None) is not None and cfg.logprob_chunk_size < 0:
        raise UserError(
            f"key 'logprob_chunk_size': must be at least 0 (0: automatic) or none, got {cfg.logprob_chunk_size}"
        )
    for name in ["max_length", "max_prompt_length"]:
        v = getattr(cfg, name, None)
        if v is not None and v < 1:
            raise UserError(f"key '{name}': must be at least 1 or none, got {v}")
    for name in [
        "learning_rate",
        "weight_decay",
        "warmup_steps",
        "max_grad_norm",
        "eval_steps",
        "save_steps",
        "ref_sync_steps",
        "simpo_gamma",
    ]:
        if hasattr(cfg, name) and getattr(cfg, name) < 0:
            raise UserError(f"key '{name}': must be non-negative, got {getattr(cfg, name)}")
    if hasattr(cfg, "beta") and not cfg.beta > 0:
        raise UserError(f"key 'beta': must be positive, got {cfg.beta}")
    for name in ["lora_alpha", "discopop_tau", "desirable_weight", "undesirable_weight"]:
        if hasattr(cfg, name) and not getattr(cfg, name) > 0:
            raise UserError(f"key '{name}': must be positive, got {getattr(cfg, name)}")
    if getattr(cfg, "max_eval_examples", None) is not None and cfg.max_eval_examples < 1:
        raise UserError(f"key 'max_eval_examples': must be at least 1 or none, got {cfg.max_eval_examples}")
    for name in ["adam_beta1", "adam_beta2"]:
        if hasattr(cfg, name) and not 0 <= getattr(cfg, name) < 1:
            raise UserError(f"key '{name}': must be in [0, 1), got {getattr(cfg, name)}")
    if hasattr(cfg, "adam_epsilon") and not cfg.adam_epsilon > 0:
        raise UserError(f"key 'adam_epsilon': must be positive, got {cfg.adam_epsilon}")
    if hasattr(cfg, "lora_dropout") and not 0 <= cfg.lora_dropout < 1:
        raise UserError(f"key 'lora_dropout': must be in [0, 1), got {cfg.lora_dropout}")
    if hasattr(cfg, "seed") and not 0 <= cfg.seed < 2**32:  # numpy's seeds are 32-bit unsigned
        raise UserError(f"key 'seed': must be in [0, 2**32), got {cfg.seed}")
    if hasattr(cfg, "label_smoothing") and not 0 <= cfg.label_smoothing < 0.5:
        raise UserError(f"key 'label_smoothing': must be in [0, 0.5), got {cfg.label_smoothing}")
    if hasattr(cfg, "temperature") and not cfg.temperature >= 0:
        raise UserError(f"key 'temperature': must be non-negative, got {cfg.temperature}")
    if hasattr(cfg, "top_p") and not 0 < cfg.top_p <= 1:
        raise UserError(f"key 'top_p': must be in (0, 1], got {cfg.top_p}")
    if hasattr(cfg, "ref_sync_alpha") and not 0 < cfg.ref_sync_alpha <= 1:
        raise UserError(f"key 'ref_sync_alpha': must be in (0, 1], got {cfg.ref_sync_alpha}")
    if hasattr(cfg, "num_train_epochs") and getattr(cfg, "max_steps", 0) <= 0 and not cfg.num_train_epochs > 0:
        raise UserError("key 'num_train_epochs': must be positive when max_steps is -1")
    if getattr(cfg, "dataset", "x") is None and not getattr(cfg, "prompts", None):
        alternative = " (or 'prompts')" if hasattr(cfg, "prompts") else ""
        raise UserError(f"key 'dataset'{alternative} is required (a file, a `datasets` directory or a hub name)")
    if hasattr(cfg, "model") and cfg.model is None:
        raise UserError("key 'model' is required")
    if getattr(cfg, "parallelism", "ddp") != "fsdp":
        for name in ("fsdp_cpu_offload",):
            if getattr(cfg, name, False):
                raise UserError(f"key '{name}': applies to parallelism=fsdp only (parallelism is {cfg.parallelism})")
        if not getattr(cfg, "fsdp_reshard_after_forward", True):
            raise UserError("key 'fsdp_reshard_after_forward': applies to parallelism=fsdp only")
    if hasattr(cfg, "check_reporting"):
        cfg.check_reporting()
    if hasattr(cfg, "check"):  # the rules of one command's own keys, kept beside them in its config class
        cfg.check()


def help_text(cls, command: str) -> str:
    """Every key with its type, default, choices and help, for `dpokit <command> --help`."""
    lines = [
        f"usage: dpokit {command} [--config FILE.yaml] [key=value ...]",
        "",
        (cls.__doc__ or "").strip(),
        "",
        "keys:",
    ]
    for f, tp in fields_of(cls):
        base, optional = _base_type(tp)
        choices = f.metadata.get("choices")
        item = _list_of(base)
        kind = "|".join(choices) if choices else (item or base).__name__
        kind = f"{kind}[,...]" if item else kind
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        if isinstance(default, list):
            default = ",".join(map(str, default))
        lines.append(f"  {f.name}={kind}  (default: {default})")
        lines.append(f"      {f.metadata.get('help', '')}")
    return "\n".join(lines)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg, path):
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
