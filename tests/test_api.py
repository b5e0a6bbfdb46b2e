"""The Python API: one function per command with the command line's keys; in-memory models and datasets;
callbacks that watch and stop a run; every example of docs/api.md and README.md runs as written."""

import json
import os
import re
from pathlib import Path

import pytest
import torch
from conftest import ROOT, standard_rows, write_jsonl
from safetensors.torch import load_file

import dpokit
from dpokit.cli import main
from dpokit.commands import COMMANDS


def test_every_command_is_a_function_with_its_config_class():
    for name, (_, cls, fn, _) in COMMANDS.items():
        assert callable(getattr(dpokit, fn)), name
        assert getattr(dpokit, cls).__name__ == cls
    assert issubclass(dpokit.UserError, ValueError)
    assert {"dpo", "sft", "rm", "rl", "evaluate", "generate", "pairs", "verify", "frontier"} <= set(dir(dpokit))


def test_config_as_object_dict_or_yaml_path_is_checked_like_the_command_line(tmp_path):
    out = tmp_path / "o"
    with pytest.raises(dpokit.UserError, match="key 'beta': must be a finite number"):
        dpokit.dpo({"dataset": "x", "beta": float("inf"), "output_dir": str(out)})
    with pytest.raises(dpokit.UserError, match=r"unknown key 'betta' \(did you mean 'beta'\?\)"):
        dpokit.dpo({"dataset": "x", "betta": 1, "output_dir": str(out)})
    with pytest.raises(dpokit.UserError, match="key 'beta': must be positive"):
        dpokit.dpo(dpokit.DPOConfig(dataset="x", beta=0.0, output_dir=str(out)))
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("dataset: x\nlearning_rate: .nan\n")
    with pytest.raises(dpokit.UserError, match=f"{yaml_file}: key 'learning_rate': must be a finite number"):
        dpokit.dpo(yaml_file)
    with pytest.raises(dpokit.UserError, match="key 'dataset' is required"):
        dpokit.dpo({"output_dir": str(out)})
    assert not out.exists()


def test_bad_rows_in_memory_name_the_argument_row_and_field(tiny_model_dir, tmp_path):
    rows = standard_rows(4)
    rows[2] = {"prompt": "p", "chosen": "c"}
    with pytest.raises(dpokit.UserError, match=r"^train_dataset: row 3: field 'rejected': missing"):
        dpokit.dpo({"model": str(tiny_model_dir), "output_dir": str(tmp_path / "o")}, train_dataset=rows)
    with pytest.raises(dpokit.UserError, match=r"^train_dataset: row 1: expected a dict of fields, got str"):
        dpokit.dpo({"model": str(tiny_model_dir), "output_dir": str(tmp_path / "o")}, train_dataset=["text"])
    assert not (tmp_path / "o").exists()


COMMON = {
    "max_steps": 3,
    "per_device_train_batch_size": 4,
    "learning_rate": 1e-3,
    "logging_steps": 1,
    "precision": "fp32",
    "progress_bar": False,
    "seed": 3,
    "beta": 0.1,
    "padding_free": True,
}


def test_api_with_objects_gives_the_command_line_weights_bitwise(tiny_model_dir, tmp_path):
    """A loaded model, its tokenizer and a datasets.Dataset through dpokit.dpo give bitwise the weights that
    the same keys give through `dpokit dpo` on a JSONL file (CPU, fp32, same seed)."""
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rows = standard_rows(16)
    write_jsonl(tmp_path / "pairs.jsonl", rows)
    args = [f"{k}={v}" for k, v in COMMON.items()]
    assert (
        main(
            [
                "dpo",
                f"model={tiny_model_dir}",
                f"dataset={tmp_path / 'pairs.jsonl'}",
                f"output_dir={tmp_path / 'cli'}",
                *args,
            ]
        )
        == 0
    )

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    result = dpokit.dpo(
        dpokit.DPOConfig(output_dir=str(tmp_path / "api"), **COMMON),
        model=model,
        tokenizer=tokenizer,
        train_dataset=datasets.Dataset.from_list(rows),
    )
    assert result.model is model and result.output_dir == tmp_path / "api"
    cli = load_file(tmp_path / "cli" / "model.safetensors")
    api = load_file(tmp_path / "api" / "model.safetensors")
    assert cli.keys() == api.keys()
    assert all(torch.equal(cli[k], api[k]) for k in cli)
    in_memory = dict(model.named_parameters())
    assert all(torch.equal(in_memory[k], api[k]) for k in api if k in in_memory)
    assert [r for r in result.metrics if "loss" in r] == [
        json.loads(x) for x in (tmp_path / "api" / "metrics.jsonl").read_text().splitlines() if '"loss"' in x
    ]
    cli_rows = [json.loads(x) for x in (tmp_path / "cli" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in cli_rows if "loss" in r] == [r["loss"] for r in result.metrics if "loss" in r]
    saved = (tmp_path / "api" / "config.yaml").read_text()
    assert "dataset: train_dataset (in memory)" in saved


def test_a_callback_stops_the_run_at_step_3_with_a_loadable_checkpoint(tiny_model_dir, pref_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    seen = {"logs": [], "evals": [], "saves": [], "begin": 0, "end": 0}

    class Stop(dpokit.Callback):
        def on_train_begin(self, state):
            seen["begin"] += 1

        def on_log(self, state, metrics):
            seen["logs"].append(metrics["step"])

        def on_evaluate(self, state, metrics):
            seen["evals"].append(metrics["step"])

        def on_save(self, state, path):
            seen["saves"].append(Path(path).name)

        def on_step_end(self, state):
            state.should_stop = state.step == 3

        def on_train_end(self, state):
            seen["end"] += 1

    out = tmp_path / "o"
    result = dpokit.dpo(
        {
            "model": str(tiny_model_dir),
            "dataset": str(pref_dir),
            "output_dir": str(out),
            **COMMON,
            "max_steps": 10,
            "max_eval_examples": 2,
        },
        callbacks=[Stop()],
    )
    assert result.stopped_early
    assert seen == {"logs": [1, 2, 3], "evals": [0, 3], "saves": ["checkpoint-3"], "begin": 1, "end": 1}
    AutoModelForCausalLM.from_pretrained(out / "checkpoint-3")
    AutoModelForCausalLM.from_pretrained(out)
    state = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["step"] == 3
    # and the run continues from there when asked
    resumed = dpokit.dpo(
        {
            "model": str(tiny_model_dir),
            "dataset": str(pref_dir),
            "output_dir": str(out),
            **COMMON,
            "max_steps": 10,
            "max_eval_examples": 2,
            "resume": "auto",
        }
    )
    assert not resumed.stopped_early and [r["step"] for r in resumed.metrics if "loss" in r] == list(range(1, 11))


def test_builtin_callbacks_are_rank_zero_outputs(tiny_model_dir, pref_dir, tmp_path):
    """metrics.jsonl and training_curves.png come from callbacks, written inside the run (under its lock)."""
    out = tmp_path / "o"
    dpokit.dpo(
        {
            "model": str(tiny_model_dir),
            "dataset": str(pref_dir),
            "output_dir": str(out),
            **COMMON,
            "max_eval_examples": 2,
        }
    )
    assert (out / "training_curves.png").stat().st_size > 0
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2, 3, 3]


# --- the examples of the docs, run as written (on the tiny model, in a scratch directory) ---------------


def python_blocks(path: Path) -> list:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


def run_example(code: str, tiny_model_dir, workdir: Path):
    assert 'model_dir = "default"' in code
    code = code.replace('model_dir = "default"', f"model_dir = {str(tiny_model_dir)!r}")
    (workdir / "data").mkdir(exist_ok=True)
    if not (workdir / "data" / "sentiment").exists():
        os.symlink(ROOT / "data" / "sentiment", workdir / "data" / "sentiment")
    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        exec(compile(code, "example", "exec"), {"__name__": "__example__"})
    finally:
        os.chdir(cwd)


DOC_EXAMPLES = [(ROOT / "docs" / "api.md", i) for i in range(len(python_blocks(ROOT / "docs" / "api.md")))] + [
    (ROOT / "README.md", i) for i in range(len(python_blocks(ROOT / "README.md")))
]


def test_the_docs_have_examples():
    assert len(python_blocks(ROOT / "docs" / "api.md")) >= 5 and python_blocks(ROOT / "README.md")


@pytest.mark.parametrize("doc, index", DOC_EXAMPLES, ids=[f"{d.name}-{i}" for d, i in DOC_EXAMPLES])
def test_doc_example_runs(doc, index, tiny_model_dir, tmp_path_factory):
    workdir = tmp_path_factory.getbasetemp() / "doc-examples"  # shared: a later example reads an earlier run
    workdir.mkdir(exist_ok=True)
    run_example(python_blocks(doc)[index], tiny_model_dir, workdir)


def test_a_peft_model_trains_its_adapters_against_its_base(tiny_model_dir, pref_dir, tmp_path):
    """model= a peft model: its adapters train (no second wrapping), pi_ref is its base with adapters off
    (so a model whose adapters already moved it starts with non-zero implicit rewards)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
    up_proj = base.model.layers[0].mlp.up_proj.weight.detach().clone()  # no adapter here
    q_proj = base.model.layers[0].self_attn.q_proj.weight.detach().clone()
    out = tmp_path / "o"
    result = dpokit.dpo(
        {**COMMON, "output_dir": str(out), "max_eval_examples": 4, "dataset": str(pref_dir)}, model=model
    )
    assert "use_lora: true" in (out / "config.yaml").read_text()
    adapter = load_file(out / "checkpoint-3" / "adapter_model.safetensors")
    assert adapter and all("lora_" in k and "base_model.model.base_model" not in k for k in adapter)  # wrapped once
    merged = result.model  # the final model: base + trained adapters, merged
    assert torch.equal(merged.model.layers[0].mlp.up_proj.weight, up_proj)
    assert not torch.equal(merged.model.layers[0].self_attn.q_proj.weight, q_proj)
    first_eval = next(r for r in result.metrics if "eval/rewards/chosen" in r)
    assert first_eval["step"] == 0 and first_eval["eval/rewards/chosen"] != 0.0
