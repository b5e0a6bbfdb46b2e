"""A TRL DPO YAML (`trl dpo --config`, examples/scripts/dpo.py) read by `dpokit dpo` unchanged.

TABLE is the one list of TRL's keys that dpokit's own do not share: ModelConfig, the script arguments
and DPOConfig / TrainingArguments. Each is mapped to dpokit keys (with a value conversion where the
meaning differs), ignored (it changes nothing here: one warning line lists them), or unsupported (one
UserError names each). Keys TRL and dpokit share (SHARED: same name, same meaning) pass through as
they are. `markdown()` writes docs/trl.md from TABLE (a test keeps the two equal).

Base layer: imports no torch, and nothing from the commands. config.load_config calls `translate` for
a config class with `accepts_trl_keys = True` (DPOConfig), on the keys from the YAML file and from
`values=`; `key=value` overrides on the command line stay dpokit keys.
"""

import dataclasses
import math
from dataclasses import dataclass

from dpokit.errors import UserError
from dpokit.report import log


class Unsupported(Exception):
    """A TRL value with no dpokit equivalent (the message says why)."""


@dataclass(frozen=True)
class Rule:
    kind: str  # "map" (to `target`, by `convert`) | "same" | "ignored" | "unsupported"
    target: str = ""  # the dpokit key(s) it sets, for the docs
    reason: str = ""  # why ignored / unsupported, or what the conversion does
    convert: object = None  # (value, values) -> {dpokit key: value}; may raise Unsupported
    neutral: tuple = (None, False)  # values that change nothing (fp16: false): dropped without a word


def rename(target):
    def convert(value, values):
        return {target: value}

    convert.renames = True  # a second name for one dpokit key: giving both is an error
    return convert


def _bf16(value, values):
    if value is None:
        return {}
    return {"precision": "bf16" if value else "fp32"}


def _fp16(value, values):
    if not value:
        return {}
    raise Unsupported("dpokit has no fp16 (bf16 autocast or fp32 only): use bf16: true")


def _dtype(value, values):
    if value in (None, "auto", "float32", "bfloat16"):
        return {}  # weights stay fp32 master weights; `bf16` / precision decides the compute
    raise Unsupported(f"{value!r}: dpokit keeps fp32 weights and computes in fp32 or bf16 (see bf16)")


SCHEDULERS = {"linear": "linear", "cosine": "cosine", "constant": "constant", "constant_with_warmup": "constant"}


def _scheduler(value, values):
    if value not in SCHEDULERS:
        raise Unsupported(f"{value!r}: dpokit's schedules are {', '.join(SCHEDULERS)}")
    return {"lr_scheduler": SCHEDULERS[value]}


OPTIMIZERS = {"adamw_torch": "adamw", "adamw_torch_fused": "adamw", "adamw_hf": "adamw", "rmsprop": "rmsprop"}


def _optim(value, values):
    if value not in OPTIMIZERS:
        raise Unsupported(f"{value!r}: dpokit's optimizers are {', '.join(OPTIMIZERS)}")
    return {"optimizer": OPTIMIZERS[value]}


def _warmup_ratio(value, values):
    if not value or values.get("warmup_steps"):  # as in TRL, warmup_steps > 0 wins over the ratio
        return {}
    max_steps = values.get("max_steps")
    if not isinstance(max_steps, int) or max_steps <= 0:
        # the total steps are known only after the data is tokenized; with max_steps they are known now
        raise Unsupported("needs max_steps > 0 (the total is unknown before the data is read): or give warmup_steps")
    return {"warmup_steps": math.ceil(float(value) * max_steps)}  # TRL's get_warmup_steps


def _strategy(steps_key, fallback):
    """save_strategy / eval_strategy: "no" is 0 steps; "steps" takes `steps_key`, else TRL's fallback."""

    def convert(value, values):
        if value == "no":  # (for eval: dpokit still evaluates before and after training, when it has data)
            return {steps_key: 0}
        if value == "steps":
            return {steps_key: values.get(steps_key) or fallback(values)}
        raise Unsupported(f"{value!r}: dpokit has 'no' and 'steps'")

    return convert


def _resume(value, values):
    if value is True:
        return {"resume": "auto"}
    return {"resume": value} if value else {}


def _sync_ref(value, values):
    if not value:
        return {"ref_sync_steps": 0}
    return {
        "ref_sync_steps": values.get("ref_model_sync_steps", 512),  # TRL's defaults
        "ref_sync_alpha": values.get("ref_model_mixup_alpha", 0.6),
    }


def _consumed(value, values):
    return {}  # read by the key that owns it (sync_ref_model, save_strategy, ...)


def _only(*ok):
    def convert(value, values):
        if value not in ok:
            raise Unsupported(f"{value!r}: dpokit does only {', '.join(map(repr, ok))}")
        return {}

    return convert


M, IGN, UNS = "map", "ignored", "unsupported"
NOTHING = "changes nothing in dpokit"
TABLE = {
    # --- ModelConfig
    "model_name_or_path": Rule(M, "model", "the policy", rename("model")),
    "model_revision": Rule(M, "-", "only main: dpokit loads the newest revision", _only("main", None)),
    "dtype": Rule(M, "-", "auto, float32, bfloat16: fp32 weights, compute per bf16", _dtype),
    "torch_dtype": Rule(M, "-", "as dtype", _dtype),
    "attn_implementation": Rule(IGN, reason="dpokit picks sdpa (eager where a layout needs it)"),
    "use_peft": Rule(M, "use_lora", "train LoRA adapters", rename("use_lora")),
    "lora_task_type": Rule(IGN, reason="always a causal LM"),
    "lora_modules_to_save": Rule(UNS, reason="LoRA trains only adapters"),
    "use_rslora": Rule(UNS, reason="rank-stabilised LoRA scaling"),
    "use_dora": Rule(UNS, reason="DoRA adapters"),
    "load_in_8bit": Rule(UNS, reason="quantized (bitsandbytes) models"),
    "load_in_4bit": Rule(UNS, reason="quantized (bitsandbytes) models"),
    "bnb_4bit_quant_type": Rule(IGN, reason="used only with load_in_4bit"),
    "use_bnb_nested_quant": Rule(IGN, reason="used only with load_in_4bit"),
    "model_init_kwargs": Rule(UNS, reason="extra from_pretrained arguments", neutral=(None, False, {})),
    "ref_model_init_kwargs": Rule(UNS, reason="extra from_pretrained arguments", neutral=(None, False, {})),
    # --- script arguments
    "dataset_name": Rule(M, "dataset", "a hub name, a local file or folder", rename("dataset")),
    "dataset_config": Rule(UNS, reason="a dataset's configuration name"),
    "dataset_streaming": Rule(UNS, reason="streaming datasets"),
    "ignore_bias_buffers": Rule(IGN, reason=NOTHING),
    # --- TrainingArguments
    "bf16": Rule(M, "precision", "true: bf16; false: fp32", _bf16),
    "fp16": Rule(M, "-", "false only: dpokit has no fp16", _fp16),
    "tf32": Rule(IGN, reason="torch's matmul precision is left as it is"),
    "lr_scheduler_type": Rule(M, "lr_scheduler", "linear, cosine, constant, constant_with_warmup", _scheduler),
    "warmup_ratio": Rule(M, "warmup_steps", "ceil(ratio * max_steps); needs max_steps > 0", _warmup_ratio),
    "optim": Rule(M, "optimizer", "adamw_torch(_fused), adamw_hf: adamw; rmsprop", _optim),
    "save_strategy": Rule(
        M,
        "save_steps",
        "no: 0 (save at the end only); steps: save_steps (else 500)",
        _strategy("save_steps", lambda values: 500),
    ),
    "eval_strategy": Rule(
        M,
        "eval_steps",
        "no: 0 (before and after training only); steps: eval_steps, else logging_steps",
        _strategy("eval_steps", lambda values: values.get("logging_steps", 10)),
    ),
    "logging_strategy": Rule(M, "-", "steps only", _only("steps")),
    "resume_from_checkpoint": Rule(M, "resume", "true: auto; a path: that checkpoint", _resume),
    "gradient_checkpointing_kwargs": Rule(IGN, reason="dpokit sets its own (non-reentrant)"),
    "logging_first_step": Rule(IGN, reason="dpokit logs its first evaluation"),
    "eval_on_start": Rule(IGN, reason="dpokit always evaluates before training when it has held-out data"),
    "logging_dir": Rule(IGN, reason="metrics go to output_dir/metrics.jsonl"),
    "log_level": Rule(IGN, reason=NOTHING),
    "overwrite_output_dir": Rule(IGN, reason=NOTHING),
    "do_train": Rule(IGN, reason=NOTHING),
    "do_eval": Rule(IGN, reason=NOTHING),
    "remove_unused_columns": Rule(IGN, reason=NOTHING),
    "dataloader_num_workers": Rule(IGN, reason="data is tokenized once, in memory"),
    "dataloader_pin_memory": Rule(IGN, reason=NOTHING),
    "dataset_num_proc": Rule("same", neutral=(None,)),
    "ddp_find_unused_parameters": Rule(IGN, reason=NOTHING),
    "ddp_timeout": Rule(IGN, reason=NOTHING),
    "local_rank": Rule(IGN, reason="torchrun sets the ranks"),
    "save_only_model": Rule(IGN, reason=NOTHING),
    "hub_strategy": Rule(IGN, reason="push_to_hub uploads at the end"),
    "hub_private_repo": Rule(IGN, reason=NOTHING),
    "use_liger_kernel": Rule(IGN, reason="a speed option"),
    "bf16_full_eval": Rule(IGN, reason="evaluation runs in `precision`"),
    # --- DPOConfig
    "sync_ref_model": Rule(M, "ref_sync_steps, ref_sync_alpha", "TR-DPO", _sync_ref),
    "ref_model_sync_steps": Rule(M, "ref_sync_steps", "read by sync_ref_model", _consumed),
    "ref_model_mixup_alpha": Rule(M, "ref_sync_alpha", "read by sync_ref_model", _consumed),
    "max_completion_length": Rule(UNS, reason="dpokit cuts responses to max_length only"),
    "label_pad_token_id": Rule(IGN, reason="dpokit masks padding itself"),
    "padding_value": Rule(IGN, reason="dpokit pads with the tokenizer's pad token"),
    "pad_token": Rule(UNS, reason="dpokit pads with the tokenizer's pad token"),
    "use_logits_to_keep": Rule(IGN, reason="dpokit computes response-token logits only (logprob_chunk_size)"),
    "generate_during_eval": Rule(UNS, reason="samples at evaluation: run `dpokit eval` after training"),
    "model_adapter_name": Rule(UNS, reason="named adapters"),
    "ref_adapter_name": Rule(UNS, reason="named adapters"),
    "tools": Rule(UNS, reason="tool definitions for the chat template"),
    "use_liger_loss": Rule(IGN, reason="a speed option"),
    "rpo_alpha": Rule("same", neutral=(None,)),
    "use_weighting": Rule("same"),
    "ld_alpha": Rule("same", neutral=(None,)),
    "f_divergence_type": Rule("same", neutral=(None, "reverse_kl")),
    "f_alpha_divergence_coef": Rule("same", neutral=(None, 1.0)),
    "report_to": Rule("same", neutral=(None, "none", [], ["none"])),
    "run_name": Rule("same", neutral=(None,)),
    "push_to_hub": Rule("same"),
    "hub_model_id": Rule("same", neutral=(None,)),
}

# TRL keys that are dpokit keys of the same name and meaning: they pass through untouched
SHARED = (
    "trust_remote_code lora_r lora_alpha lora_dropout lora_target_modules dataset_train_split dataset_test_split "
    "output_dir seed learning_rate weight_decay adam_beta1 adam_beta2 adam_epsilon warmup_steps max_grad_norm "
    "num_train_epochs max_steps "
    "per_device_train_batch_size per_device_eval_batch_size gradient_accumulation_steps gradient_checkpointing "
    "logging_steps save_steps save_total_limit eval_steps max_length max_prompt_length truncation_mode "
    "padding_free precompute_ref_log_probs disable_dropout loss_type loss_weights beta label_smoothing "
    "reference_free"
).split()


def _neutral(value, rule) -> bool:
    return any(value == n and isinstance(value, bool) == isinstance(n, bool) for n in rule.neutral)


def translate(values: dict, cls) -> dict:
    """{key: (value, source)} with TRL's keys replaced by dpokit's. A key dpokit knows passes through; a
    key neither knows is left for load_config's did-you-mean error. Ignored keys: one warning line;
    unsupported keys: one UserError naming each."""
    fields = {f.name for f in dataclasses.fields(cls)}
    trl = [k for k in values if k not in fields and k in TABLE]
    if not trl:
        return values
    plain = {k: v for k, (v, _) in values.items()}
    out = {k: vs for k, vs in values.items() if k not in trl}
    ignored, unsupported, updates = [], [], {}
    for key in trl:
        value, source = values[key]
        rule = TABLE[key]
        if rule.kind == "ignored":
            ignored.append(key)
        elif rule.kind == "same":  # a key dpokit is adding under TRL's name: the class says if it has it yet
            if not _neutral(value, rule):
                unsupported.append(f"'{key}' (not supported by dpokit yet)")
        elif rule.kind == "unsupported":
            if not _neutral(value, rule):
                unsupported.append(f"'{key}' ({rule.reason})")
        else:
            try:
                for target, v in rule.convert(value, plain).items():
                    if target in values and getattr(rule.convert, "renames", False) and values[target][0] != v:
                        unsupported.append(f"'{key}' (sets '{target}', also given: keep one)")
                    updates[target] = (v, source)
            except Unsupported as e:
                unsupported.append(f"'{key}' ({e})")
    if unsupported:
        where = values[trl[0]][1]
        raise UserError(f"{where}: TRL keys dpokit does not support: {'; '.join(unsupported)} (see docs/trl.md)")
    if ignored:
        log.warning("TRL keys that change nothing in dpokit, ignored: %s (see docs/trl.md)", ", ".join(ignored))
    out.update(updates)
    return out


def markdown() -> str:
    """docs/trl.md: TABLE as a page."""
    lines = [
        "# A TRL DPO config in dpokit",
        "",
        "<!-- generated by dpokit.trl_keys.markdown(); tests/test_trl_config.py keeps it equal -->",
        "",
        "`dpokit dpo --config trl.yaml` (and `dpokit.dpo(path_or_dict)`) reads the YAML of TRL's DPO script",
        "(`ModelConfig`, the script arguments, `DPOConfig` / `TrainingArguments`) unchanged. The keys that TRL",
        "and dpokit share mean the same and pass through; the others are translated by the table below",
        "(`src/dpokit/trl_keys.py`, which writes this page). Keys that change nothing here are listed in one",
        "warning line; keys whose behaviour dpokit lacks are one error naming each (exit 2, nothing written).",
        "A value in *neutral* (such as `fp16: false`) changes nothing and is accepted silently.",
        "`key=value` on the command line takes dpokit's keys only.",
        "",
        "Shared keys: " + ", ".join(f"`{k}`" for k in SHARED) + ".",
        "",
        "| TRL key | dpokit | how |",
        "| --- | --- | --- |",
    ]
    for key, rule in TABLE.items():
        neutral = ", ".join("null" if n is None else str(n).lower() for n in rule.neutral)
        if rule.kind == "map":
            row = (rule.target, rule.reason)
        elif rule.kind == "same":
            row = (key, f"the same key, once dpokit has it (else an error unless {neutral})")
        elif rule.kind == "ignored":
            row = ("ignored", rule.reason)
        else:
            row = ("error", f"{rule.reason} (accepted: {neutral})")
        lines.append(f"| `{key}` | {row[0]} | {row[1]} |")
    return "\n".join(lines) + "\n"
