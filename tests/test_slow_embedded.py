"""The embedded SmolLM2-135M-Instruct end to end (slow: CI runs these only if time allows)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import write_jsonl

DATA = Path(__file__).resolve().parents[1] / "data" / "sentiment"
pytestmark = pytest.mark.slow


def test_dpo_and_eval_on_the_embedded_model(tmp_path):
    rows = [json.loads(x) for x in (DATA / "train.jsonl").read_text().splitlines()[:8]]
    (tmp_path / "d").mkdir()
    write_jsonl(tmp_path / "d" / "train.jsonl", rows)
    write_jsonl(tmp_path / "d" / "test.jsonl", rows[:4])
    out = tmp_path / "run"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "dpokit.cli",
            "dpo",
            "model=default",
            f"dataset={tmp_path / 'd'}",
            f"output_dir={out}",
            "max_steps=3",
            "per_device_train_batch_size=8",
            "learning_rate=5e-6",
            "logging_steps=1",
            "progress_bar=false",
            "precision=bf16",
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [x for x in rows if "eval/loss" in x]
    assert evals[-1]["eval/loss"] < evals[0]["eval/loss"]  # the same pairs: memorised
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "dpokit.cli",
            "eval",
            f"model={out}",
            "ref_model=default",
            f"dataset={tmp_path / 'd'}",
            "num_samples=4",
            "max_new_tokens=16",
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    result = json.loads((out / "eval.json").read_text())
    assert result["reference"]["implicit_reward_accuracy"] == 0.5
    assert result["policy"]["implicit_reward_accuracy"] > 0.5
    assert "vader reward" in r.stdout
