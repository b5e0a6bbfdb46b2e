"""Configuration and the command line: help, unknown keys, bad values, and bad input ending in one
`error:` line, exit code 2 and nothing written to output_dir."""

import subprocess
import sys

import pytest
from conftest import write_jsonl

from dpokit.cli import main
from dpokit.commands.dpo import DPOConfig
from dpokit.config import fields_of, load_config
from dpokit.errors import UserError


def test_help_lists_every_key(capsys):
    assert main(["dpo", "--help"]) == 0
    out = capsys.readouterr().out
    for f, _ in fields_of(DPOConfig):
        assert f"  {f.name}=" in out
        assert f.metadata["help"] in out


def test_yaml_and_overrides(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("dataset: d.jsonl\nbeta: 0.5\noptimizer: rmsprop\nmax_prompt_length: null\n")
    cfg = load_config(DPOConfig, cfg_file, ["beta=0.25", "precision=bf16", "max_steps=3"])
    assert (cfg.beta, cfg.optimizer, cfg.precision, cfg.max_steps, cfg.max_prompt_length) == (
        0.25,
        "rmsprop",
        "bf16",
        3,
        None,
    )


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["dataset=x", "betta=1"], "unknown key 'betta' (did you mean 'beta'?)"),
        (["dataset=x", "optimizer=sgd"], "key 'optimizer': 'sgd' is not one of adamw, rmsprop"),
        (["dataset=x", "lr_scheduler=step"], "key 'lr_scheduler': 'step' is not one of constant, linear, cosine"),
        (["dataset=x", "max_steps=ten"], "key 'max_steps': 'ten' is not a valid int"),
        (["dataset=x", "beta=0"], "key 'beta': must be positive"),
        (["dataset=x", "label_smoothing=0.7"], "key 'label_smoothing'"),
        (["dataset=x", "per_device_train_batch_size=0"], "key 'per_device_train_batch_size': must be at least 1"),
        (["beta=0.1"], "key 'dataset' is required"),
        (["dataset=x", "precision"], "override 'precision' is not key=value"),
    ],
)
def test_bad_config(overrides, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)").replace("?", r"\?")):
        load_config(DPOConfig, None, overrides)


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "dpokit.cli", *map(str, args)], capture_output=True, text=True)


@pytest.mark.parametrize(
    "content,expected",
    [
        (
            b'{"prompt": "p", "chosen": "c", "rejected": "r"}\n{"prompt": "p", "chosen": "", "rejected": "r"}\n',
            "bad.jsonl: row 2: field 'chosen': empty string",
        ),
        (b'{"prompt": "p", "chosen": "c"}\n', "bad.jsonl: row 1: field 'rejected': missing"),
        (b'{"prompt": "p", "chosen": "c", "rejected": "r"}\n{oops\n', "bad.jsonl: row 2: malformed JSON"),
        (b"", "bad.jsonl: no rows"),
    ],
)
def test_cli_bad_input_one_line_exit_2_nothing_written(tiny_model_dir, tmp_path, content, expected):
    data = tmp_path / "bad.jsonl"
    data.write_bytes(content)
    out = tmp_path / "out"
    r = run_cli("dpo", f"model={tiny_model_dir}", f"dataset={data}", f"output_dir={out}", "progress_bar=false")
    assert r.returncode == 2
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expected in errors[0], r.stderr
    assert "Traceback" not in r.stderr
    assert not out.exists()


def test_cli_errors_for_paths_and_keys(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "chosen": "c", "rejected": "r"}])
    r = run_cli("dpo", f"dataset={data}", f"model={tmp_path / 'missing-model'}")
    assert r.returncode == 2 and "missing-model: model not found" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("dpo", f"dataset={data}", "optimizer=lion")
    assert (
        r.returncode == 2
        and r.stderr.strip() == "error: command line: key 'optimizer': 'lion' is not one of adamw, rmsprop"
    )
    r = run_cli("dpo", "--config", tmp_path / "nope.yaml")
    assert r.returncode == 2 and "nope.yaml: config file not found" in r.stderr
    r = run_cli("frobnicate")
    assert r.returncode == 2 and "unknown command 'frobnicate'" in r.stderr
