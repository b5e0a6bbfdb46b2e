"""A TRL DPO YAML runs unchanged (trl_keys.py): mapped keys, ignored keys (one warning line),
unsupported keys (one error naming each, exit 2, nothing written), and docs/trl.md equal to the table."""

import dataclasses
import logging

import pytest
import yaml
from conftest import ROOT

from dpokit import trl_keys
from dpokit.cli import main
from dpokit.commands.dpo import DPOConfig
from dpokit.config import load_config
from dpokit.errors import UserError


def trl_yaml(tiny_model_dir, pref_dir, out):
    """The shape of a config of TRL's examples/scripts/dpo.py (ModelConfig, script args, DPOConfig)."""
    return {
        # ModelConfig
        "model_name_or_path": str(tiny_model_dir),
        "model_revision": "main",
        "dtype": "bfloat16",
        "attn_implementation": "sdpa",
        "trust_remote_code": False,
        "use_peft": True,
        "lora_r": 8,
        "lora_alpha": 16,
        "lora_dropout": 0.05,
        "lora_target_modules": ["q_proj", "v_proj"],
        "load_in_4bit": False,
        # script arguments
        "dataset_name": str(pref_dir),
        "dataset_config": None,
        "dataset_train_split": "train",
        "dataset_test_split": "test",
        # DPOConfig / TrainingArguments
        "bf16": False,
        "fp16": False,
        "learning_rate": 1.0e-3,
        "lr_scheduler_type": "cosine",
        "warmup_ratio": 0.5,
        "max_steps": 2,
        "per_device_train_batch_size": 4,
        "per_device_eval_batch_size": 4,
        "gradient_accumulation_steps": 1,
        "gradient_checkpointing": False,
        "logging_steps": 1,
        "eval_strategy": "no",
        "save_strategy": "no",
        "save_steps": 500,
        "max_length": 128,
        "max_prompt_length": 64,
        "max_completion_length": None,
        "loss_type": "sigmoid",
        "loss_weights": None,
        "beta": 0.1,
        "label_smoothing": 0.0,
        "rpo_alpha": None,
        "use_weighting": False,
        "ld_alpha": None,
        "f_divergence_type": "reverse_kl",
        "f_alpha_divergence_coef": 1.0,
        "padding_free": True,
        "precompute_ref_log_probs": False,
        "sync_ref_model": False,
        "ref_model_sync_steps": 512,
        "ref_model_mixup_alpha": 0.6,
        "run_name": "trl-yaml",
        "hub_model_id": None,
        "optim": "adamw_torch",
        "report_to": "none",
        "push_to_hub": False,
        "seed": 42,
        "output_dir": str(out),
        "dataloader_num_workers": 0,
        "remove_unused_columns": False,
    }


def write(path, keys):
    path.write_text(yaml.safe_dump(keys, sort_keys=False))
    return path


def test_trl_yaml_runs_unchanged(tiny_model_dir, pref_dir, tmp_path, caplog):
    out = tmp_path / "run"
    path = write(tmp_path / "trl.yaml", trl_yaml(tiny_model_dir, pref_dir, out))
    with caplog.at_level(logging.WARNING, logger="dpokit"):
        assert main(["dpo", "--config", str(path)]) == 0
    assert (out / "model.safetensors").is_file()
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["model"] == str(tiny_model_dir) and saved["dataset"] == str(pref_dir)
    assert saved["precision"] == "fp32" and saved["use_lora"] is True and saved["lora_r"] == 8
    assert saved["lr_scheduler"] == "cosine" and saved["warmup_steps"] == 1  # ceil(0.5 * 2)
    assert saved["optimizer"] == "adamw" and saved["save_steps"] == 0 and saved["eval_steps"] == 0
    assert saved["loss_type"] == ["sigmoid"] and saved["ref_sync_steps"] == 0
    warnings = [r.getMessage() for r in caplog.records if "TRL keys that change nothing" in r.getMessage()]
    assert len(warnings) == 1
    assert all(k in warnings[0] for k in ("attn_implementation", "dataloader_num_workers", "remove_unused_columns"))


def test_trl_dict_in_python(tiny_model_dir, pref_dir, tmp_path):
    keys = trl_yaml(tiny_model_dir, pref_dir, tmp_path / "run")
    keys.update(bf16=True, sync_ref_model=True, ref_model_sync_steps=3, use_peft=False, save_strategy="steps")
    keys.update(save_steps=7, eval_strategy="steps", resume_from_checkpoint=True, lr_scheduler_type="constant")
    cfg = load_config(DPOConfig, values=keys)
    assert cfg.precision == "bf16" and cfg.ref_sync_steps == 3 and cfg.ref_sync_alpha == 0.6
    assert cfg.save_steps == 7 and cfg.eval_steps == 1  # eval_steps falls back to logging_steps, as in TRL
    assert cfg.resume == "auto" and cfg.lr_scheduler == "constant" and cfg.use_lora is False


def test_unsupported_keys_are_one_error(tiny_model_dir, pref_dir, tmp_path, capsys):
    out = tmp_path / "run"
    keys = trl_yaml(tiny_model_dir, pref_dir, out)
    keys.update(fp16=True, max_completion_length=256, dataset_config="plain_text", optim="paged_adamw_8bit")
    path = write(tmp_path / "trl.yaml", keys)
    assert main(["dpo", "--config", str(path)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1
    for key in ("'fp16'", "'max_completion_length'", "'dataset_config'", "'optim'"):
        assert key in errors[0]
    assert not out.exists()


def test_ignored_keys_are_one_warning(tiny_model_dir, pref_dir, tmp_path, caplog):
    keys = trl_yaml(tiny_model_dir, pref_dir, tmp_path / "run")
    keys.update(logging_dir="logs", overwrite_output_dir=True, ddp_find_unused_parameters=False)
    with caplog.at_level(logging.WARNING, logger="dpokit"):
        load_config(DPOConfig, write(tmp_path / "trl.yaml", keys))
    lines = [r.getMessage() for r in caplog.records if "TRL keys" in r.getMessage()]
    assert len(lines) == 1
    for key in ("logging_dir", "overwrite_output_dir", "ddp_find_unused_parameters", "dataloader_num_workers"):
        assert key in lines[0]


@pytest.mark.parametrize(
    "key,value",
    [
        ("rpo_alpha", 0.5),
        ("use_weighting", True),
        ("ld_alpha", 0.5),
        ("f_divergence_type", "js_divergence"),
        ("f_alpha_divergence_coef", 0.5),
        ("report_to", ["tensorboard"]),
        ("run_name", "my-run"),
        ("push_to_hub", True),
        ("hub_model_id", "me/my-model"),
    ],
)
def test_keys_dpokit_is_adding_map_one_to_one(key, value, tmp_path):
    """Whether or not the key has landed in dpokit's config yet: the same value, or a clear error."""
    keys = {"model_name_or_path": "m", "dataset_name": "d", key: value}
    if key in {f.name for f in dataclasses.fields(DPOConfig)}:
        assert getattr(load_config(DPOConfig, values=keys, validate_now=False), key) == value
    else:
        with pytest.raises(UserError, match=f"'{key}' \\(not supported by dpokit yet\\)"):
            load_config(DPOConfig, values=keys, validate_now=False)


def test_conflicts_and_warmup_ratio_without_max_steps():
    with pytest.raises(UserError, match="'dataset_name' \\(sets 'dataset', also given"):
        load_config(DPOConfig, values={"dataset_name": "a", "dataset": "b"}, validate_now=False)
    with pytest.raises(UserError, match="'warmup_ratio' \\(needs max_steps > 0"):
        load_config(DPOConfig, values={"dataset_name": "a", "warmup_ratio": 0.1}, validate_now=False)


def test_dpokit_keys_untouched_and_overrides_stay_dpokit_keys(tmp_path):
    cfg = load_config(DPOConfig, values={"dataset": "d", "max_steps": 3}, validate_now=False)
    assert cfg.dataset == "d" and cfg.precision == "auto"
    path = write(tmp_path / "trl.yaml", {"dataset_name": "d", "bf16": True})
    assert load_config(DPOConfig, path, ["precision=fp32"]).precision == "fp32"
    with pytest.raises(UserError, match="unknown key 'bf16'"):
        load_config(DPOConfig, path, ["bf16=false"])


def test_table_keys_and_docs():
    fields = {f.name for f in dataclasses.fields(DPOConfig)}
    assert set(trl_keys.SHARED) <= fields  # shared keys are dpokit keys
    for key, rule in trl_keys.TABLE.items():
        assert rule.kind in ("map", "same", "ignored", "unsupported"), key
        assert rule.kind == "same" or key not in fields, key  # else the key would never be translated
    assert (ROOT / "docs" / "trl.md").read_text() == trl_keys.markdown()


def test_a_key_dpokit_lacks_yet_is_an_error_and_a_neutral_value_is_not():
    """`same` keys are decided by the class's fields at run time (a class without rpo_alpha)."""

    @dataclasses.dataclass
    class Minimal:
        model: str = "m"

    values = {"model_name_or_path": ("m", "x.yaml"), "rpo_alpha": (0.5, "x.yaml"), "push_to_hub": (False, "x.yaml")}
    with pytest.raises(UserError, match=r"^x.yaml: TRL keys .*'rpo_alpha' \(not supported by dpokit yet\)") as e:
        trl_keys.translate(values, Minimal)
    assert "push_to_hub" not in str(e.value)  # false changes nothing
    assert trl_keys.translate({**values, "rpo_alpha": (None, "x.yaml")}, Minimal) == {"model": ("m", "x.yaml")}
