"""Hostile configuration: every bad key, value or config file is one `error:` line naming the key or the
file, exit code 2, no traceback, and nothing written. Valid values that look odd are accepted as typed."""

import pytest
from conftest import one_error_line

from dpokit.cli import main
from dpokit.commands.dpo import DPOConfig
from dpokit.commands.evaluate import EvalConfig
from dpokit.config import load_config

# command-line overrides -> the text the one error line must contain
OVERRIDES = {
    # non-finite numbers (they once trained silently wrong, or not at all)
    "lr-inf": (["learning_rate=inf"], "key 'learning_rate': must be a finite number"),
    "lr-nan": (["learning_rate=nan"], "key 'learning_rate': must be a finite number"),
    "beta-inf": (["beta=inf"], "key 'beta': must be a finite number"),
    "beta-minus-inf": (["beta=-inf"], "key 'beta': must be a finite number"),
    "grad-norm-nan": (["max_grad_norm=nan"], "key 'max_grad_norm': must be a finite number"),
    "epochs-inf": (["num_train_epochs=inf"], "key 'num_train_epochs': must be a finite number"),
    "label-smoothing-nan": (["label_smoothing=NaN"], "key 'label_smoothing': must be a finite number"),
    "weight-decay-inf": (["weight_decay=Infinity"], "key 'weight_decay': must be a finite number"),
    "alpha-nan": (["ref_sync_alpha=nan"], "key 'ref_sync_alpha': must be a finite number"),
    "simpo-gamma-inf": (["simpo_gamma=1e999"], "key 'simpo_gamma': must be a finite number"),
    "loss-weight-nan": (["loss_type=sigmoid,sft", "loss_weights=1,nan"], "key 'loss_weights': must be a finite number"),
    "lora-alpha-inf": (["lora_alpha=inf"], "key 'lora_alpha': must be a finite number"),
    # ranges
    "seed-negative": (["seed=-1"], "key 'seed': must be in [0, 2**32)"),
    "seed-huge": (["seed=4294967296"], "key 'seed': must be in [0, 2**32)"),
    "int-beyond-64-bits": (
        ["max_steps=99999999999999999999999"],
        "key 'max_steps': 99999999999999999999999 is out of range",
    ),
    "int-4301-digits": (["max_steps=" + "9" * 4301], "key 'max_steps': '99999"),
    "lora-dropout-one": (["lora_dropout=1.0"], "key 'lora_dropout': must be in [0, 1)"),
    "lora-dropout-negative": (["lora_dropout=-0.1"], "key 'lora_dropout': must be in [0, 1)"),
    "lora-alpha-zero": (["lora_alpha=0"], "key 'lora_alpha': must be positive"),
    "discopop-tau-zero": (["discopop_tau=0"], "key 'discopop_tau': must be positive"),
    "kto-weight-negative": (["desirable_weight=-1"], "key 'desirable_weight': must be positive"),
    "ref-sync-negative": (["ref_sync_steps=-2"], "key 'ref_sync_steps': must be non-negative"),
    "max-eval-zero": (["max_eval_examples=0"], "key 'max_eval_examples': must be at least 1 or none"),
    "simpo-gamma-negative": (["simpo_gamma=-1"], "key 'simpo_gamma': must be non-negative"),
    "float-for-int": (["max_steps=2.5"], "key 'max_steps': '2.5' is not a valid int"),
    "word-for-bool": (["use_lora=maybe"], "key 'use_lora': 'maybe' is not a valid bool"),
    "null-for-float": (["beta=null"], "key 'beta': 'null' is not a valid float"),
    # combinations
    "lora-trdpo-without-reference": (
        ["use_lora=true", "ref_sync_steps=2"],
        "key 'ref_sync_steps': TR-DPO moves the reference, so with use_lora",
    ),
    "kto-reference-free": (["loss_type=kto", "reference_free=true"], "key 'reference_free': not supported with kto"),
    "kto-combined": (["loss_type=kto,sigmoid"], "key 'loss_type': kto trains on unpaired data"),
    "precision-fp16": (["precision=fp16"], "key 'precision': 'fp16' is not one of auto, fp32, bf16"),
    # command-line syntax
    "no-equals": (["beta"], "override 'beta' is not key=value"),
    "empty-key": (["=3"], "unknown key ''"),
    "unknown-option": (["--beta=1"], "unknown option '--beta=1'"),
}

# config file contents (bytes) -> the text the one error line must contain ("{f}" is the file's path)
FILES = {
    "bad-yaml": (b"beta: [1, 2\n", "{f}: not valid YAML"),
    "tab-indented": (b"beta: 0.1\n\tlearning_rate: 1\n", "{f}: not valid YAML"),
    "not-utf8": (b"beta: 0.1\noutput_dir: caf\xe9\n", "{f}: not valid UTF-8 (byte"),
    "a-list": (b"- beta\n- 0.1\n", "{f}: expected a mapping of key: value"),
    "a-scalar": (b"0.1\n", "{f}: expected a mapping of key: value"),
    "int-key": (b"1: 0.1\n", "{f}: key 1 is not a name"),
    "null-key": (b"~: 0.1\n", "{f}: key None is not a name"),
    "list-key": (b"? [a, b]\n: 0.1\n", "{f}: not valid YAML"),
    "bool-key": (b"true: 0.1\n", "{f}: key True is not a name"),
    "nested-value": (b"beta: {a: 1}\n", "key 'beta': expected a single float, got a dict"),
    "list-for-string": (b"model: [a, b]\n", "key 'model': expected a single str, got a list"),
    "deep-nesting": (b"beta: " + b"[" * 5000 + b"]" * 5000 + b"\n", "{f}: not valid YAML"),
    "inf-in-yaml": (b"learning_rate: .inf\n", "key 'learning_rate': must be a finite number"),
    "nan-in-yaml": (b"beta: .nan\n", "key 'beta': must be a finite number"),
    "unknown-key": (b"betta: 0.1\n", "{f}: unknown key 'betta' (did you mean 'beta'?)"),
    "bool-for-int": (b"max_steps: true\n", "key 'max_steps': True is not a valid int"),
}


def run_cli(capsys, args):
    code = main(["dpo", *args])
    err = capsys.readouterr().err
    return code, err


def assert_one_error_line(code, err, expected):
    assert code == 2, err
    one_error_line(err, expected, only=True)


@pytest.mark.parametrize("name", sorted(OVERRIDES))
def test_bad_override(name, tmp_path, capsys):
    args, expected = OVERRIDES[name]
    out = tmp_path / "out"
    code, err = run_cli(capsys, ["dataset=x", f"output_dir={out}", *args])
    assert_one_error_line(code, err, expected)
    assert not out.exists()


@pytest.mark.parametrize("name", sorted(FILES))
def test_bad_config_file(name, tmp_path, capsys):
    content, expected = FILES[name]
    f = tmp_path / f"{name}.yaml"
    f.write_bytes(content)
    out = tmp_path / "out"
    code, err = run_cli(capsys, ["--config", str(f), "dataset=x", f"output_dir={out}"])
    assert_one_error_line(code, err, expected.format(f=f))
    assert not out.exists()


def test_missing_and_directory_config_files(tmp_path, capsys):
    for path in (tmp_path / "nope.yaml", tmp_path):
        code, err = run_cli(capsys, ["--config", str(path), "dataset=x"])
        assert_one_error_line(code, err, f"{path}: config file not found")


# --- valid input that once was mangled or rejected ------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        "runs/my run #3",
        "runs/a: b",
        "runs/[x]",
        "runs/{y}",
        "yes",
        "null",
        "0.10",
        "~/out",
        "runs/'q'",
        "!tag",
        "&anchor",
        "*alias",
        "runs/%x",
    ],
)
def test_override_values_reach_string_keys_as_typed(value):
    assert load_config(DPOConfig, None, ["dataset=x", f"output_dir={value}"]).output_dir == value


def test_override_values_are_converted_by_the_key_type():
    cfg = load_config(
        DPOConfig,
        None,
        [
            "dataset=d.jsonl",
            "beta=0.25",
            "max_steps=3",
            "use_lora=yes",
            "max_prompt_length=none",
            "loss_type=sigmoid,sft",
            "loss_weights=1,0.5",
            "lora_target_modules=[q_proj, 'v_proj']",
            "eval_dataset=",
        ],
    )
    assert (cfg.beta, cfg.max_steps, cfg.use_lora, cfg.max_prompt_length) == (0.25, 3, True, None)
    assert cfg.loss_type == ["sigmoid", "sft"] and cfg.loss_weights == [1.0, 0.5]
    assert cfg.lora_target_modules == ["q_proj", "v_proj"] and cfg.eval_dataset is None


def test_config_file_with_a_byte_order_mark(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_bytes("\ufeffbeta: 0.3\ndataset: d.jsonl\n".encode("utf-8"))
    assert load_config(DPOConfig, f).beta == 0.3


def test_eval_precision_defaults_to_auto():
    assert load_config(EvalConfig, None, ["model=m", "dataset=d"]).precision == "auto"
