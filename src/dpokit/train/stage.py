"""What a stage's job (`dpokit sft`, `rm`, `rl`) does around its step, the same way for every stage:
which data it trains and evaluates on, refusing config switches it does not implement, activation
checkpointing. (train/dpo.py does the same inline.)"""

from dpokit.data.load import FILE_SUFFIXES, MissingSplit
from dpokit.errors import UserError


def train_and_eval(cfg, load) -> tuple[list, list]:
    """load(source, split) -> examples. Returns (train examples, held-out examples or []): held out is
    `eval_dataset`, else the test split of a `dataset` that has splits, else nothing (as in dpo.py)."""
    train = load(cfg.dataset, cfg.dataset_train_split)
    if cfg.eval_dataset is not None:
        held_out = load(cfg.eval_dataset, cfg.dataset_test_split)
    elif cfg.dataset.endswith(FILE_SUFFIXES):
        held_out = []  # a single file has no held-out split; name one with eval_dataset
    else:
        try:
            held_out = load(cfg.dataset, cfg.dataset_test_split)
        except MissingSplit:
            held_out = []
    return train, held_out[: cfg.max_eval_examples] if cfg.max_eval_examples else held_out


def refuse(cfg, command: str, keys):
    """A UserError for a TrainConfig switch the stage does not implement, rather than ignoring it."""
    for key in keys:
        if getattr(cfg, key, None):
            raise UserError(f"key '{key}': not supported by `dpokit {command}`")


def enable_gradient_checkpointing(model, lora: bool = False):
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x's name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if lora:
        model.enable_input_require_grads()
