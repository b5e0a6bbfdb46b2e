"""What every training command (dpo, sft, rm, rl) does around its step, written once: devices and seed,
the output_dir checks, the tokenizer, the data (files, `datasets` objects or lists of rows), the model
(loaded, or the one the caller holds), its reference, LoRA and activation checkpointing, and the
hand-over to the shared loop. Everything that can fail on bad input happens before output_dir is
touched."""

import contextlib
import copy
from dataclasses import dataclass

from dpokit import models
from dpokit.config import in_memory_name
from dpokit.config import resolve_config as resolve
from dpokit.data.arrow import prepare_once, tokenize_to_table
from dpokit.data.load import FILE_SUFFIXES, MissingSplit, named
from dpokit.errors import UserError
from dpokit.report import log
from dpokit.train import loop
from dpokit.train.runtime import Ranks, set_seed, setup_distributed


def resolve_config(cls, config, *, model=None, ref_model=None, train_dataset=None, eval_dataset=None):
    """config.resolve_config, with the objects given in place of the path keys recorded in those keys
    (a model's name_or_path, "train_dataset (in memory)"), so config.yaml says what was trained."""
    return resolve(
        cls,
        config,
        use_lora=True if model is not None and models.is_peft(model) else None,  # a peft model trains its adapters
        model=in_memory_name(model),
        ref_model=in_memory_name(ref_model),
        dataset=in_memory_name(train_dataset, "train_dataset"),
        eval_dataset=in_memory_name(eval_dataset, "eval_dataset"),
    )


@dataclass
class Prepared:
    """A training command's inputs, ready for the loop."""

    ranks: Ranks
    tokenizer: object
    train_examples: list
    eval_examples: list
    model: object


def train_and_eval(cfg, load, train_dataset=None, eval_dataset=None) -> tuple[list, list]:
    """load(source, split) -> examples. Returns (train examples, held-out examples or []): held out is
    `eval_dataset`, else the test split of a `dataset` that has splits, else nothing."""
    train_source = cfg.dataset if train_dataset is None else named(train_dataset, "train_dataset")
    eval_source = cfg.eval_dataset if eval_dataset is None else named(eval_dataset, "eval_dataset")
    train = load(train_source, cfg.dataset_train_split)
    if eval_source is not None:
        held_out = load(eval_source, cfg.dataset_test_split)
    elif isinstance(train_source, str) and train_source.endswith(FILE_SUFFIXES):
        held_out = []  # a single file has no held-out split; name one with eval_dataset
    else:
        try:
            held_out = load(train_source, cfg.dataset_test_split)
        except MissingSplit:
            held_out = []
    return train, held_out[: cfg.max_eval_examples] if cfg.max_eval_examples else held_out


def load_pair_split(cfg, tokenizer, source, split) -> list:
    """Tokenized preference pairs of one split of a source (dpo and rm read pairs alike): a PairTable read
    from the memory-mapped, cached Arrow table (data/arrow.py)."""
    examples, label, fmt, stats = prepare_once(
        lambda: tokenize_to_table(
            tokenizer,
            source,
            split,
            cfg.max_length,
            cfg.max_prompt_length,
            cfg.truncation_mode,
            num_proc=cfg.dataset_num_proc,
            use_cache=cfg.cache_tokenized,
        )
    )
    log.info("%s (%s): %s", label, fmt, stats.summary())
    return examples


def refuse(cfg, command: str, keys):
    """A UserError for a TrainConfig switch the stage does not implement, rather than ignoring it."""
    for key in keys:
        if getattr(cfg, key, None):
            raise UserError(f"key '{key}': not supported by `dpokit {command}`")


def prepare(
    cfg, load_split, *, model=None, tokenizer=None, train_dataset=None, eval_dataset=None, load_model=None
) -> Prepared:
    """Devices, seed, output_dir checks, tokenizer, data, then the model (the caller's, or loaded with
    `load_model(name, trust_remote_code)`), with dropout off when cfg.disable_dropout."""
    ranks = setup_distributed(getattr(cfg, "parallelism", "ddp"))
    set_seed(cfg.seed)
    loop.check_output_dir(cfg)
    if tokenizer is None:
        tokenizer = models.load_tokenizer(cfg.model, cfg.trust_remote_code)
    train, held_out = train_and_eval(
        cfg, lambda source, split: load_split(cfg, tokenizer, source, split), train_dataset, eval_dataset
    )
    if model is None:
        model = (load_model or models.load_model)(cfg.model, cfg.trust_remote_code)
    loop.check_output_dir(cfg, sum(p.numel() for p in model.parameters()))
    if cfg.disable_dropout:
        models.disable_dropout(model)
    return Prepared(ranks, tokenizer, train, held_out, model)


def reference_model(cfg, policy, ref_model=None):
    """pi_ref: the caller's model, else `ref_model` loaded, else the policy itself (the caller copies it
    when the policy will train); frozen, dropout off, on the run's device."""
    if ref_model is None:
        ref_model = models.load_model(cfg.ref_model, cfg.trust_remote_code) if cfg.ref_model else policy
    models.disable_dropout(ref_model)
    return ref_model


def base_model(model):
    """A context in which a peft model computes with its adapters disabled (its base model); for any other
    model, nothing changes."""
    return model.disable_adapter() if models.is_peft(model) else contextlib.nullcontext()


def frozen_copy(model):
    return copy.deepcopy(model).requires_grad_(False).eval()


def enable_gradient_checkpointing(model, lora: bool = False):
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x's name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if lora:
        model.enable_input_require_grads()


def save_with_tokenizer(tokenizer):
    """The loop's save function: the model (a LoRA model as its adapter in checkpoints, merged in the
    final directory) and the tokenizer, as a directory `from_pretrained` loads."""

    def save(model, out_dir, final=False, state_dict=None):  # state_dict: a sharded model's, gathered
        gathered = {} if state_dict is None else {"state_dict": state_dict}
        return models.save_model(model, tokenizer, out_dir, merge_lora=final, **gathered)

    return save


def train(cfg, prepared: Prepared, step, collate, *, callbacks=(), plot_keys=(), save_fn=None, what="model"):
    """The shared loop on the prepared inputs; logs where the model went."""
    result = loop.train(
        cfg,
        prepared.model,
        step,
        prepared.train_examples,
        prepared.eval_examples,
        collate,
        prepared.ranks,
        save_fn=save_fn or save_with_tokenizer(prepared.tokenizer),
        callbacks=callbacks,
        plot_keys=plot_keys,
    )
    if prepared.ranks.main:
        log.info("saved the %s to %s", what, cfg.output_dir)
    return result
