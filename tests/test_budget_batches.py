"""Token-budget micro-batches (train/order.py, max_tokens_per_batch): every micro-batch within the budget
as the collated tensors measure it, every pair once per epoch, seeded and resumable, a pair over the
budget named; and training on them equals training on the same pairs batched by hand."""

import json

import conftest
import numpy as np
import pytest
from conftest import ROOT

from dpokit.data.arrow import tokenize_to_table
from dpokit.data.layouts import LAYOUTS, collate_for
from dpokit.errors import UserError
from dpokit.train import order
from dpokit.train.order import BudgetPlan, batch_tokens, budget_batches
from dpokit.train.runtime import Ranks

BUNDLED = ROOT / "data" / "sentiment" / "train.jsonl"


@pytest.fixture(scope="module")
def table(smol_tokenizer, tmp_path_factory):
    import os

    os.environ["DPOKIT_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    try:
        return tokenize_to_table(smol_tokenizer, str(BUNDLED), "train", 256, 128, "keep_end")[0]
    finally:
        del os.environ["DPOKIT_CACHE"]


def collated_tokens(layout, pairs) -> int:
    """The batch's size as the layout's own tensors have it: every position of input_ids, padding included."""
    return collate_for(layout, 0)(pairs)["input_ids"].numel()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_no_micro_batch_exceeds_the_budget(table, layout):
    budget = 1200
    ranks = Ranks()
    n = len(BudgetPlan(table, budget, layout))
    stream = budget_batches(table, budget, layout, seed=3, ranks=ranks)
    epoch = [next(stream) for _ in range(n)]
    assert sorted(i for b in epoch for i in b) == list(range(len(table)))  # every pair once per epoch
    padding = []
    for idx in epoch:
        pairs = [table[i] for i in idx]
        size = collated_tokens(layout, pairs)
        assert size == batch_tokens(layout, pairs) <= budget
        real = sum(2 * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)
        padding.append(1 - real / size if layout.endswith("padded") else 0)
    # a greedy cut of sorted lengths: all batches but the last of the sort are full enough not to take
    # the next pair, so few batches are small
    assert np.median([len(b) for b in epoch]) > 1
    if layout == "padded":  # similar lengths together: little padding (vs ~0.3 for random batches of 8)
        assert np.mean(padding) < 0.15


def test_seeded_and_resumable(table):
    ranks = Ranks()
    a = budget_batches(table, 900, "prefix_shared_packed", seed=7, ranks=ranks)
    first = [next(a) for _ in range(300)]  # past an epoch boundary
    b = budget_batches(table, 900, "prefix_shared_packed", seed=7, ranks=ranks, start=123)
    assert [next(b) for _ in range(177)] == first[123:]
    c = budget_batches(table, 900, "prefix_shared_packed", seed=8, ranks=ranks)
    assert [next(c) for _ in range(50)] != first[:50]
    n = len(BudgetPlan(table, 900, "prefix_shared_packed"))
    assert first[:n] != first[n : 2 * n]  # a new order each epoch


def test_ranks_share_the_epoch(table):
    plans = [budget_batches(table, 900, "packed", 1, Ranks(rank=r, world=2)) for r in (0, 1)]
    n = len(BudgetPlan(table, 900, "packed"))
    got = [next(plans[r % 2]) for r in range(n)]
    assert sorted(i for b in got for i in b) == list(range(len(table)))


def test_a_pair_over_the_budget_is_named(table):
    longest = int(np.argmax(table.lengths()[0] + table.lengths()[1] + table.lengths()[2]))
    p = table[longest]
    need = len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids)
    with pytest.raises(UserError, match=rf"max_tokens_per_batch.*row {p.row} alone takes {need} tokens"):
        BudgetPlan(table, need - 1, "prefix_shared_packed")


def test_config_key_checks():
    from dpokit.commands.dpo import DPOConfig
    from dpokit.config import validate

    with pytest.raises(UserError, match="max_tokens_per_batch': must be at least 1"):
        validate(DPOConfig(dataset="x", max_tokens_per_batch=0))
    with pytest.raises(UserError, match="not kto"):
        validate(DPOConfig(dataset="x", max_tokens_per_batch=100, loss_type=["kto"]))


def train_rows(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]


@pytest.mark.parametrize(
    "layout,budget", [({}, 160), ({"padding_free": False, "prefix_sharing": False}, 300)], ids=["fast", "padded"]
)
def test_budget_training_equals_the_same_pairs_batched_by_hand(
    tiny_model_dir, pref_dir, tmp_path, monkeypatch, layout, budget
):
    """Budget micro-batches of uneven sizes, accumulated over 2 per step, against one hand-made batch
    holding the very pairs of each step: the same loss, margins and gradient norm at every step (the
    loop weights every pair equally, whatever its micro-batch's size)."""
    monkeypatch.setenv("DPOKIT_CACHE", str(tmp_path / "cache"))
    kw = dict(optimizer="rmsprop", precision="fp32", max_steps=3, eval_steps=0, max_eval_examples=1, **layout)
    streams = []
    real_stream = order.stream

    def recording(cfg, examples, ranks, start=0):
        s = real_stream(cfg, examples, ranks, start)
        taken = []
        streams.append(taken)
        return (taken.append(b) or b for b in s)

    monkeypatch.setattr(order, "stream", recording)
    conftest.run_dpo(
        tiny_model_dir, pref_dir, tmp_path / "budget", max_tokens_per_batch=budget, gradient_accumulation_steps=2, **kw
    )
    micro = streams[0]
    assert len(micro) == 6 and len({len(b) for b in micro}) > 1  # uneven micro-batches
    by_hand = [micro[i] + micro[i + 1] for i in range(0, 6, 2)]  # each step's pairs, one batch
    monkeypatch.setattr(order, "stream", lambda cfg, examples, ranks, start=0: iter(by_hand[start:]))
    conftest.run_dpo(tiny_model_dir, pref_dir, tmp_path / "hand", per_device_train_batch_size=99, **kw)
    for a, b in zip(train_rows(tmp_path / "budget"), train_rows(tmp_path / "hand"), strict=True):
        for key in ("loss", "rewards/margins", "logps/chosen", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key


def test_sigkill_then_resume_is_bitwise_identical_with_budget_batches(tiny_model_dir, pref_dir, tmp_path):
    """Killed mid-epoch after the step-3 checkpoint, resumed: the same weights, byte for byte, and metrics."""
    import signal

    from test_resume import common, metrics, run

    def args(out):
        return common(tiny_model_dir, pref_dir, out) + ["max_steps=6", "max_tokens_per_batch=150"]

    base, out = tmp_path / "base", tmp_path / "run"
    assert run(args(base)).returncode == 0
    assert run(args(out), {"DPOKIT_KILL_AT": "step:5"}).returncode == -signal.SIGKILL
    r = run(args(out) + ["resume=auto"])
    assert r.returncode == 0 and "resuming from" in r.stderr, r.stderr
    assert (out / "model.safetensors").read_bytes() == (base / "model.safetensors").read_bytes()
    assert metrics(out) == metrics(base)


def test_two_ranks_with_budget_batches_equal_one_process_on_the_same_pairs(
    tiny_model_dir, pref_dir, tmp_path, monkeypatch
):
    """torchrun, 2 ranks, uneven budget micro-batches (rank r takes runs r, r+2, ...): every pair weighs the
    same across ranks, so the steps equal one process fed, per step, the union of both ranks' batches.
    One held-out pair: rank 1 has none, yet DDP's forward is collective (it broadcasts buffers), so it must
    run as many eval batches as rank 0 (counting nothing) rather than hang."""
    import subprocess
    import sys

    monkeypatch.setenv("DPOKIT_CACHE", str(tmp_path / "cache"))
    keys = dict(max_steps=2, precision="fp32", learning_rate=1e-3, max_eval_examples=1, seed=5)
    cli = [f"{k}={v}" for k, v in keys.items()] + [f"model={tiny_model_dir}", f"dataset={pref_dir}"]
    r = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "dpokit.cli", "dpo", *cli]
        + [f"output_dir={tmp_path / 'ddp'}", "max_tokens_per_batch=260", "logging_steps=1", "progress_bar=false"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    taken = {}
    real_stream = order.stream

    def union(cfg, examples, ranks, start=0):
        per_rank = [real_stream(cfg, examples, Ranks(rank=k, world=2), start) for k in (0, 1)]
        batches = [next(per_rank[0]) + next(per_rank[1]) for _ in range(keys["max_steps"])]
        taken["sizes"] = [len(b) for b in batches]
        return iter(batches)

    monkeypatch.setattr(order, "stream", union)
    conftest.run_dpo(tiny_model_dir, pref_dir, tmp_path / "one", max_tokens_per_batch=260, **keys)
    ddp, one = train_rows(tmp_path / "ddp"), train_rows(tmp_path / "one")
    assert len(ddp) == len(one) == 2
    for a, b in zip(ddp, one):
        for key in ("loss", "rewards/margins", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
    evals = [
        [json.loads(x)["eval/loss"] for x in (out / "metrics.jsonl").read_text().splitlines() if "eval/loss" in x]
        for out in (tmp_path / "ddp", tmp_path / "one")
    ]
    assert evals[0] and evals[0] == pytest.approx(evals[1], rel=1e-4)
