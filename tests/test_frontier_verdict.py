"""`dpokit frontier`'s estimates and verdict on synthetic evals whose answer is known: per-prompt rewards
built as reference + f(KL) + noise for two methods, checkpoints of several runs each; the verdict must
name the method that is higher where it is, say "no difference larger than X" (X small) where the
curves are the same, and "not reached" past a method's largest KL. The oracle and best-of-n curves
come from the reference's extra samples."""

import json

import numpy as np
import pytest
from test_frontier import DPO_CFG, PPO_CFG

from dpokit.commands.frontier import frontier
from dpokit.estimators import best_of_n, oracle_tilt

P = 200


def write_eval(run_dir, step, cfg, rewards, kls, ref_rewards, many=None):
    d = run_dir / f"checkpoint-{step}"
    d.mkdir(parents=True)
    (d / "trainer_state.json").write_text(json.dumps({"step": step, "config": cfg, "scheduler": {}}))
    reference = {"model": "ref", "reward": float(np.mean(ref_rewards)), "reward_se": 0.01, "kl": 0.0, "kl_se": 0.0}
    reference["per_prompt"] = {"reward": list(map(float, ref_rewards))}
    if many is not None:
        reference["rewards_per_prompt"] = many
    policy = {"model": str(d), "reward": float(np.mean(rewards)), "reward_se": 0.01, "kl": float(np.mean(kls))}
    policy.update(kl_se=0.01, per_prompt={"reward": list(map(float, rewards)), "kl": list(map(float, kls))})
    data = {"reward_fn": "vader", "num_samples": P, "prompts_fingerprint": "same", "reference": reference}
    (d / "eval.json").write_text(json.dumps({**data, "policy": policy}))


def sweep(root, slopes, kl_ranges, noise=0.05):
    """Per method: reward_i = ref_i + slope * KL + noise_i at checkpoints spread over its KL range,
    two runs (settings) per method, per-prompt KLs scattered around the checkpoint's KL."""
    rng = np.random.default_rng(0)
    ref = rng.normal(0.0, 0.3, P)
    many = rng.normal(0.0, 0.3, (P, 16)).round(4).tolist()
    for method, cfg in (("dpo", DPO_CFG), ("rloo", {**PPO_CFG, "algorithm": "rloo"})):
        for run_no in range(2):
            run = root / f"{method}-{run_no}"
            for step, kl in enumerate(np.linspace(*kl_ranges[method], 5), 1):
                kls = kl * rng.uniform(0.5, 1.5, P)
                rewards = ref + slopes[method] * kl + rng.normal(0, noise, P)
                write_eval(run, step, {**cfg, "seed": run_no}, rewards, kls, ref, many if method == "dpo" else None)
    return ref, many


def verdict_at(result, kl):
    (v,) = [v for v in result["verdict"] if v["kl"] == kl]
    return v


def test_verdict_names_the_higher_method_and_says_not_reached(tmp_path):
    sweep(tmp_path / "runs", {"dpo": 0.2, "rloo": 0.1}, {"dpo": (0.3, 4.5), "rloo": (0.3, 2.5)})
    result = frontier({"inputs": [str(tmp_path / "runs")], "output_dir": str(tmp_path / "f"), "bootstrap_samples": 200})
    for kl in (0.5, 1.0, 2.0):
        v = verdict_at(result, kl)
        assert (v["a"], v["b"]) == ("dpo", "rloo")
        assert v["text"].startswith("dpo higher by"), v
        assert v["low"] < 0.1 * kl < v["high"] and v["low"] > 0  # the true difference (0.2 - 0.1) KL, inside
    for kl in (3.0, 4.0):
        assert verdict_at(result, kl)["text"] == "not reached by rloo"
    for kl in (0.5, 2.0):  # two seeds per method (run_no): each seed's own fit finds the same difference
        by_seed = verdict_at(result, kl)["by_seed"]
        assert set(by_seed) == {"0", "1"} and all(d == pytest.approx(0.1 * kl, abs=0.03) for d in by_seed.values())
    assert verdict_at(result, 4.0)["by_seed"] == {"0": None, "1": None}
    md = (tmp_path / "f" / "frontier.md").read_text()
    assert "| 2 | dpo | rloo |" in md and "not reached by rloo" in md
    assert "A - B by seed" in md and "seed 1: +0.2" in md and "seed 0: not reached" in md
    assert result["frontiers"]["dpo"]["points"] == 10 and result["frontiers"]["dpo"]["points_between_0.5_and_4"] >= 5


def test_verdict_with_equal_frontiers_bounds_the_difference(tmp_path):
    sweep(tmp_path / "runs", {"dpo": 0.1, "rloo": 0.1}, {"dpo": (0.3, 4.5), "rloo": (0.3, 4.5)})
    result = frontier({"inputs": [str(tmp_path / "runs")], "output_dir": str(tmp_path / "f"), "bootstrap_samples": 200})
    for kl in (0.5, 1.0, 2.0, 3.0, 4.0):
        v = verdict_at(result, kl)
        assert v["text"].startswith("no difference larger than"), v
        assert max(abs(v["low"]), abs(v["high"])) < 0.08


def test_verdict_flags_a_frontier_interpolated_across_a_gap(tmp_path):
    """Where a method has no checkpoint within a factor 2 of the KL, its frontier there is a straight line
    from its neighbours (pi_ref at 0, a checkpoint far above): the verdict says so, with the neighbours."""
    sweep(tmp_path / "runs", {"dpo": 0.1, "rloo": 0.1}, {"dpo": (0.3, 4.5), "rloo": (2.2, 4.5)})
    result = frontier({"inputs": [str(tmp_path / "runs")], "output_dir": str(tmp_path / "f"), "bootstrap_samples": 50})
    low = verdict_at(result, 0.5)
    assert low["support"]["rloo"]["near"] is False and low["support"]["rloo"]["below"] == 0.0
    assert low["support"]["rloo"]["above"] == pytest.approx(2.2, abs=0.15)  # the first checkpoint's mean KL
    assert low["support"]["dpo"]["near"] is True
    assert "; interpolated: rloo has no checkpoint within a factor 2 of it (nearest at 0.00 and 2." in low["text"]
    assert "interpolated: rloo" in verdict_at(result, 1.0)["text"]  # 2.2 nats is more than twice 1
    for kl in (2.0, 3.0, 4.0):
        v = verdict_at(result, kl)
        assert v["support"]["rloo"]["near"] and v["support"]["dpo"]["near"] and "interpolated" not in v["text"], v
    assert "interpolated: rloo" in (tmp_path / "f" / "frontier.md").read_text()


def test_oracle_and_best_of_n_curves_come_from_the_reference_samples(tmp_path):
    _, many = sweep(tmp_path / "runs", {"dpo": 0.2, "rloo": 0.1}, {"dpo": (0.3, 4.5), "rloo": (0.3, 4.5)})
    result = frontier({"inputs": [str(tmp_path / "runs")], "output_dir": str(tmp_path / "f"), "bootstrap_samples": 20})
    oracle, bon = result["oracle"], result["best_of_n"]
    assert oracle["samples_per_prompt"] == 16 and oracle["kl"] == sorted(oracle["kl"])
    # every point of the curve is the tilt at some beta: reward rises with KL, from pi_ref's mean at KL ~0
    assert oracle["reward"] == sorted(oracle["reward"])
    assert oracle["reward"][0] == pytest.approx(np.mean(many), abs=0.01) and oracle["kl"][0] < 0.01
    r, kl = oracle_tilt(many, 0.5)
    assert np.interp(kl, oracle["kl"], oracle["reward"]) == pytest.approx(r, abs=0.01)
    assert bon["n"] == [1, 2, 4, 8, 16]
    assert bon["reward"][2] == pytest.approx(best_of_n(many, 4)[0])
    assert all(a < b for a, b in zip(bon["reward"], bon["reward"][1:]))
    assert (tmp_path / "f" / "frontier.png").stat().st_size > 10_000
