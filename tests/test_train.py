"""The shared loop with the DPO step: gradient accumulation, repeatability, the CLI end to end on a
tiny random model, and the saved model reloading with the same log-probs."""

import copy
import json
import subprocess
import sys

import pytest
import torch
from conftest import conversational_rows
from transformers import AutoModelForCausalLM

from dpokit.commands import dpo
from dpokit.commands.dpo import DPOConfig
from dpokit.data.batch import collate_padded
from dpokit.data.tokenize import tokenize_pair
from dpokit.logprobs import sequence_logps
from dpokit.train import loop
from dpokit.train.dpo_step import DPOStep
from dpokit.train.metrics import MetricSums
from dpokit.train.runtime import Ranks


@pytest.fixture
def tiny(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)


def make_pairs(tok, n=8):
    return [tokenize_pair(tok, r) for r in conversational_rows(n)]


def accumulated_grads(model, step, pairs, batch_size, pad_id):
    model.zero_grad()
    micro = [collate_padded(pairs[i : i + batch_size], pad_id) for i in range(0, len(pairs), batch_size)]
    loop.forward_backward(model, step, micro, Ranks(), "fp32", MetricSums())
    return [p.grad.clone() for p in model.parameters()]


def test_gradient_accumulation_4x2_equals_1x8(tiny, smol_tokenizer):
    reference = copy.deepcopy(tiny).eval()
    with torch.no_grad():  # move the policy away from the reference so the loss is not at its symmetric point
        for p in tiny.parameters():
            p.add_(0.01 * torch.randn_like(p))
    step = DPOStep(reference, DPOConfig(dataset="unused", beta=0.5))
    pairs = make_pairs(smol_tokenizer, 8)
    pairs[3].chosen_ids = pairs[3].chosen_ids * 2  # uneven lengths: padding differs between layouts
    g8 = accumulated_grads(tiny, step, pairs, 8, smol_tokenizer.pad_token_id)
    g2 = accumulated_grads(tiny, step, pairs, 2, smol_tokenizer.pad_token_id)
    g3 = accumulated_grads(tiny, step, pairs, 3, smol_tokenizer.pad_token_id)  # 3+3+2: uneven micro-batches
    assert any(g.abs().max() > 0 for g in g8)
    for a, b, c in zip(g8, g2, g3):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)
        assert torch.allclose(a, c, atol=1e-5, rtol=1e-4)


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "dpokit.cli", *map(str, args)], capture_output=True, text=True)


def test_cli_end_to_end(tiny_model_dir, pref_dir, tmp_path):
    out = tmp_path / "run"
    r = run_cli(
        "dpo",
        f"model={tiny_model_dir}",
        f"dataset={pref_dir}",
        f"output_dir={out}",
        "max_steps=4",
        "per_device_train_batch_size=2",
        "gradient_accumulation_steps=2",
        "logging_steps=1",
        "eval_steps=2",
        "learning_rate=1e-3",
        "warmup_steps=1",
        "lr_scheduler=cosine",
        "progress_bar=false",
    )
    assert r.returncode == 0, r.stderr
    for name in (
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "config.yaml",
        "metrics.jsonl",
        "training_curves.png",
    ):
        assert (out / name).is_file(), name
    assert not list(out.glob("*.bin")) and not list(out.glob("*.pt"))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    eval_rows = [r for r in rows if "eval/loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4]
    assert [r["step"] for r in eval_rows] == [0, 2, 4]
    for key in (
        "loss",
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "rewards/accuracies",
        "logps/chosen",
        "logps/rejected",
        "grad_norm",
        "learning_rate",
        "tokens_per_second",
        "peak_memory_mb",
    ):
        assert all(key in r for r in train_rows), key
        if key not in ("grad_norm", "learning_rate", "tokens_per_second", "peak_memory_mb"):
            assert all("eval/" + key in r for r in eval_rows), key
    assert eval_rows[0]["eval/rewards/accuracies"] == 0.5 and eval_rows[0]["eval/rewards/margins"] == 0.0
    assert eval_rows[-1]["eval/loss"] < eval_rows[0]["eval/loss"]  # memorisable data: the loss goes down
    assert train_rows[0]["learning_rate"] == pytest.approx(1e-3 / 2)  # warmup: (step + 1) / (warmup + 1)
    AutoModelForCausalLM.from_pretrained(out)  # loads straight into transformers


def test_saved_model_gives_same_logps(tiny_model_dir, pref_dir, tmp_path, smol_tokenizer):
    cfg = DPOConfig(
        model=str(tiny_model_dir),
        dataset=str(pref_dir),
        output_dir=str(tmp_path / "o"),
        max_steps=2,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        progress_bar=False,
    )
    trained = dpo.dpo(cfg).model
    batch = collate_padded(make_pairs(smol_tokenizer, 4), smol_tokenizer.pad_token_id)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "o", dtype=torch.float32).eval()
    original = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        a = sequence_logps(trained.eval(), batch)[0]
        b = sequence_logps(reloaded, batch)[0]
        c = sequence_logps(original, batch)[0]
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)  # training did change the model


def test_same_seed_same_trajectory(tiny_model_dir, pref_dir, tmp_path):
    runs = []
    for name in ("a", "b"):
        r = run_cli(
            "dpo",
            f"model={tiny_model_dir}",
            f"dataset={pref_dir}",
            f"output_dir={tmp_path / name}",
            "max_steps=3",
            "per_device_train_batch_size=4",
            "logging_steps=1",
            "learning_rate=1e-3",
            "seed=7",
            "progress_bar=false",
        )
        assert r.returncode == 0, r.stderr
        rows = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        runs.append([(x["step"], x["loss"], x["grad_norm"]) for x in rows if "loss" in x])
    assert runs[0] == runs[1]


def test_torchrun_two_ranks_match_one_process(tiny_model_dir, pref_dir, tmp_path):
    """2 ranks x 2 pairs see the same examples as 1 process x 4 pairs (rank r takes order[r::2]), so the
    first step's loss, the all-reduced metrics and the saved weights agree."""
    common = [
        f"model={tiny_model_dir}",
        f"dataset={pref_dir}",
        "max_steps=2",
        "logging_steps=1",
        "precision=fp32",
        "learning_rate=1e-3",
        "progress_bar=false",
        "max_eval_examples=2",
    ]
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "-m",
            "dpokit.cli",
            "dpo",
            *common,
            f"output_dir={tmp_path / 'ddp'}",
            "per_device_train_batch_size=2",
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_cli("dpo", *common, f"output_dir={tmp_path / 'one'}", "per_device_train_batch_size=4")
    assert r.returncode == 0, r.stderr
    rows = {
        name: [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
        for name in ("ddp", "one")
    }
    for a, b in zip(rows["ddp"], rows["one"]):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert a["rewards/margins"] == pytest.approx(b["rewards/margins"], abs=1e-5)
    from safetensors.torch import load_file

    wa, wb = load_file(tmp_path / "ddp" / "model.safetensors"), load_file(tmp_path / "one" / "model.safetensors")
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)
