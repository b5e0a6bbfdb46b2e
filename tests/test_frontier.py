"""`dpokit frontier` on synthetic eval results laid out as real runs lay them out (checkpoint-<step>/ with
trainer_state.json, final directories with config.yaml), its one-line errors on bad input, and the
examples/sentiment driver end to end at its smallest scale on a tiny random model."""

import json
import os
import subprocess
import sys
import time

import pytest
import yaml
from conftest import ROOT

from dpokit.cli import main

DPO_CFG = {"loss_type": ["sigmoid"], "beta": 0.1, "learning_rate": 2e-5}
PPO_CFG = {"algorithm": "ppo", "kl_coef": 0.05, "adaptive_kl": False, "learning_rate": 1e-5}


def eval_result(reward, kl, model="runs/x", reward_se=0.05, kl_se=0.1, ref_reward=0.1, reward_fn="vader"):
    """What `dpokit eval` writes (evaluate.run), with the fields frontier reads."""
    return {
        "dataset": "data/sentiment/test.jsonl",
        "pairs": 64,
        "beta": 0.1,
        "reward_fn": reward_fn,
        "num_samples": 64,
        "reference": {
            "model": "default",
            "implicit_reward_accuracy": 0.5,
            "implicit_reward_margin": 0.0,
            "reward": ref_reward,
            "reward_se": 0.04,
            "kl": 0.0,
            "kl_se": 0.0,
            "samples": [],
        },
        "policy": {
            "model": model,
            "implicit_reward_accuracy": 0.7,
            "implicit_reward_margin": 0.3,
            "reward": reward,
            "reward_se": reward_se,
            "kl": kl,
            "kl_se": kl_se,
            "samples": [],
            "win_rate": 0.6,
            "win_rate_se": 0.05,
        },
    }


def checkpoint(run_dir, step, cfg, reward, kl, **kw):
    d = run_dir / f"checkpoint-{step}"
    d.mkdir(parents=True)
    (d / "trainer_state.json").write_text(json.dumps({"step": step, "config": cfg, "scheduler": {}}))
    (d / "eval.json").write_text(json.dumps(eval_result(reward, kl, model=str(d), **kw)))
    return d / "eval.json"


@pytest.fixture
def runs(tmp_path):
    """Two DPO betas and one PPO kl_coef, several checkpoints each; the first DPO run's final directory too."""
    root = tmp_path / "runs"
    a = root / "dpo-beta0.1"
    for step, (r, kl) in {8: (0.2, 1.0), 16: (0.5, 2.0), 24: (0.4, 3.0)}.items():
        checkpoint(a, step, DPO_CFG, r, kl)
    (a / "config.yaml").write_text(yaml.safe_dump(DPO_CFG))  # the final model = checkpoint-24's
    (a / "eval.json").write_text(json.dumps(eval_result(0.4, 3.0, model=str(a))))
    b = root / "dpo-beta1"
    for step, (r, kl) in {8: (0.15, 0.3), 16: (0.25, 0.6)}.items():
        checkpoint(b, step, {**DPO_CFG, "beta": 1.0}, r, kl)
    c = root / "ppo-kl0.05"
    for step, (r, kl) in {6: (0.3, 4.0), 12: (0.45, 6.0)}.items():
        checkpoint(c, step, PPO_CFG, r, kl)
    return root


def test_frontier_points_methods_table_and_png(runs, tmp_path, capsys):
    out = tmp_path / "frontier"
    assert main(["frontier", f"inputs={runs}", f"output_dir={out}"]) == 0
    result = json.loads((out / "frontier.json").read_text())
    got = [(p["method"], p["setting"], p["step"], p["kl"], p["reward"], p["on_front"]) for p in result["points"]]
    # one point per (run, step): the final directory of dpo-beta0.1 is its checkpoint-24, read once
    # the front is the method's, across its runs: beta=1's (0.6, 0.25) beats beta=0.1's (1.0, 0.2)
    assert got == [
        ("dpo", "beta=0.1", 8, 1.0, 0.2, False),
        ("dpo", "beta=0.1", 16, 2.0, 0.5, True),
        ("dpo", "beta=0.1", 24, 3.0, 0.4, False),  # checkpoint-16 has less KL and more reward
        ("dpo", "beta=1", 8, 0.3, 0.15, True),
        ("dpo", "beta=1", 16, 0.6, 0.25, True),
        ("ppo", "kl_coef=0.05", 6, 4.0, 0.3, True),
        ("ppo", "kl_coef=0.05", 12, 6.0, 0.45, True),
    ]
    assert {p["run"] for p in result["points"]} == {
        str((runs / d).resolve()) for d in ("dpo-beta0.1", "dpo-beta1", "ppo-kl0.05")
    }
    p = result["points"][0]
    assert (p["reward_se"], p["kl_se"], p["win_rate"], p["implicit_reward_accuracy"]) == (0.05, 0.1, 0.6, 0.7)
    (ref,) = result["references"]
    assert (ref["method"], ref["kl"], ref["reward"], ref["reward_se"]) == ("reference", 0.0, 0.1, 0.04)
    assert result["reward_fn"] == "vader"

    png = (out / "frontier.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and 10_000 < len(png) < 300_000
    table = (out / "frontier.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith(("| method", "| ---"))]
    assert len(rows) == 1 + 7
    assert "| dpo | beta=0.1 | 16 | 2.00 ± 0.100 | +0.500 ± 0.050 |  | 0.600 ± 0.050 |  | 0.700 | * |" in table
    assert "| ppo | kl_coef=0.05 | 6 | 4.00 ± 0.100 | +0.300 ± 0.050 |  | 0.600 ± 0.050 |  | 0.700 | * |" in table
    assert "| dpo | beta=0.1 | 24 | 3.00 ± 0.100 | +0.400 ± 0.050 |  | 0.600 ± 0.050 |  | 0.700 |  |" in table
    assert "| reference | default | 0 | 0.00 ± 0.000 | +0.100 ± 0.040 |" in table
    assert "7 points from 8 eval results" in capsys.readouterr().out


def test_frontier_accepts_files_and_globs_and_rloo(runs, tmp_path):
    d = runs / "rloo-kl0.1"
    checkpoint(d, 5, {**PPO_CFG, "algorithm": "rloo", "kl_coef": 0.1, "adaptive_kl": True, "target_kl": 2.7}, 0.6, 2.5)
    out = tmp_path / "f"
    # a glob (what a shell would expand, quoted) plus one explicit file; the policy found by `policy.model`
    # when the eval JSON lies elsewhere
    elsewhere = tmp_path / "evals" / "ppo6.json"
    elsewhere.parent.mkdir()
    elsewhere.write_text((runs / "ppo-kl0.05" / "checkpoint-6" / "eval.json").read_text())
    assert main(["frontier", f"inputs={runs}/rloo*/checkpoint-*/eval.json,{elsewhere}", f"output_dir={out}"]) == 0
    got = [(p["method"], p["setting"], p["step"]) for p in json.loads((out / "frontier.json").read_text())["points"]]
    assert got == [("ppo", "kl_coef=0.05", 6), ("rloo", "target_kl=2.7 (adaptive, kl_coef=0.1 at start)", 5)]


def test_frontier_table_shows_the_paired_difference_and_finished(tmp_path):
    """The table carries what an eval for sweeps adds: the paired reward difference against pi_ref with its
    standard error, and the fraction of responses finished, for the policy and the reference."""
    f = checkpoint(tmp_path / "runs" / "rloo", 27, {**PPO_CFG, "algorithm": "rloo"}, 0.568, 2.2)
    data = json.loads(f.read_text())
    data["policy"].update(reward_diff=0.3124, reward_diff_se=0.0371, finished=0.7591)
    data["reference"]["finished"] = 0.8
    f.write_text(json.dumps(data))
    out = tmp_path / "f"
    assert main(["frontier", f"inputs={tmp_path / 'runs'}", f"output_dir={out}"]) == 0
    table = (out / "frontier.md").read_text()
    assert (
        "| rloo | kl_coef=0.05 | 27 | 2.20 ± 0.100 | +0.568 ± 0.050 | +0.312 ± 0.037 | 0.600 ± 0.050 | 0.76 |" in table
    )
    assert "| reference | default | 0 | 0.00 ± 0.000 | +0.100 ± 0.040 | | | 0.80 | | |" in table


def test_frontier_skips_the_reference_evaluated_against_itself(runs, tmp_path):
    own = eval_result(0.1, 0.0, model="default")
    (runs / "reference-eval.json").write_text(json.dumps(own))
    out = tmp_path / "f"
    assert main(["frontier", f"inputs={runs}", f"output_dir={out}"]) == 0
    result = json.loads((out / "frontier.json").read_text())
    assert len(result["points"]) == 7 and len(result["references"]) == 1


def bad(runs, tmp_path, case):
    """Make the input of one bad case; return (inputs, the file the error must name, expected text)."""
    f = runs / "dpo-beta1" / "checkpoint-8" / "eval.json"
    if case == "missing path":
        return str(tmp_path / "nope"), tmp_path / "nope", "no such file or directory"
    if case == "empty directory":
        (tmp_path / "empty").mkdir()
        return str(tmp_path / "empty"), tmp_path / "empty", "no files matching 'eval*.json'"
    if case == "glob matches nothing":
        return f"{runs}/*/nothing-*.json", f"{runs}/*/nothing-*.json", "no files match this pattern"
    if case == "malformed json":
        f.write_text('{"policy": {"reward": 0.1,')
    elif case == "not an object":
        f.write_text("[1, 2]")
    elif case == "no policy":
        f.write_text(json.dumps({"reference": eval_result(0, 0)["reference"]}))
    elif case == "no reward (eval without reward=)":
        data = eval_result(0.2, 1.0)
        del data["policy"]["reward"]
        f.write_text(json.dumps(data))
    elif case == "kl not a number":
        data = eval_result(0.2, 1.0)
        data["policy"]["kl"] = "big"
        f.write_text(json.dumps(data))
    elif case == "no run beside it":
        f = tmp_path / "loose" / "eval.json"
        f.parent.mkdir()
        f.write_text(json.dumps(eval_result(0.2, 1.0, model="somewhere/else")))
        return str(f), f, "cannot tell which run made policy 'somewhere/else'"
    elif case == "broken trainer state":
        (f.parent / "trainer_state.json").write_text("{}")
        return str(runs), f.parent / "trainer_state.json", "not a dpokit checkpoint state"
    elif case == "not a training config":
        (f.parent / "trainer_state.json").write_text(json.dumps({"step": 8, "config": {"model": "x"}}))
        return str(runs), f, "neither `dpokit dpo`, `rl` nor `sft`"
    elif case == "different rewards":
        f.write_text(json.dumps(eval_result(0.2, 1.0, model=str(f.parent), reward_fn="rm:runs/rm")))
        return str(runs), f, "scored with reward 'rm:runs/rm'"
    expected = {
        "malformed json": "not valid JSON",
        "not an object": "expected a `dpokit eval` result",
        "no policy": "field 'policy' missing",
        "no reward (eval without reward=)": "field 'policy.reward' missing",
        "kl not a number": "field 'policy.kl': expected a number",
    }[case]
    return str(runs), f, expected


@pytest.mark.parametrize(
    "case",
    [
        "missing path",
        "empty directory",
        "glob matches nothing",
        "malformed json",
        "not an object",
        "no policy",
        "no reward (eval without reward=)",
        "kl not a number",
        "no run beside it",
        "broken trainer state",
        "not a training config",
        "different rewards",
    ],
)
def test_frontier_bad_input_is_one_line_naming_the_file(case, runs, tmp_path, capsys):
    inputs, named, expected = bad(runs, tmp_path, case)
    out = tmp_path / "out"
    assert main(["frontier", f"inputs={inputs}", f"output_dir={out}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {named}") and expected in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_frontier_needs_inputs(capsys):
    assert main(["frontier"]) == 2
    assert "key 'inputs' is required" in capsys.readouterr().err


def test_sentiment_driver_end_to_end_smoke(tiny_model_dir, tmp_path):
    """examples/sentiment/run.py at --scale smoke on a tiny random model: DPO and PPO train and checkpoint,
    every checkpoint is evaluated (PPO's without transformers' report on its value head), the frontier is
    drawn from the runs' own configs; a second invocation finds every stage done and only redraws."""
    out = tmp_path / "sentiment"
    cmd = [
        sys.executable,
        "examples/sentiment/run.py",
        "--scale",
        "smoke",
        "--model",
        str(tiny_model_dir),
        "--out",
        str(out),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "UNEXPECTED" not in proc.stderr and "LOAD REPORT" not in proc.stderr
    result = json.loads((out / "frontier" / "frontier.json").read_text())
    got = [(p["method"], p["setting"], p["step"]) for p in result["points"]]
    assert got == [("dpo", "beta=0.1", 1), ("dpo", "beta=0.1", 2), ("ppo", "kl_coef=0.05", 1)]
    for p in result["points"]:
        evaluated = json.loads(open(p["file"]).read())
        assert evaluated["num_samples"] == 4 and evaluated["policy"]["model"].endswith(f"checkpoint-{p['step']}")
    # evaluation needs only weights: older checkpoints lose their optimizer state, the newest stays resumable
    assert not (out / "dpo-beta0.1" / "checkpoint-1" / "optimizer.pt").exists()
    assert (out / "dpo-beta0.1" / "checkpoint-2" / "optimizer.pt").is_file()
    stages = json.loads((out / "stages.json").read_text())
    assert len(stages) == 1 + 1 + 3 + 1 and all(v["seconds"] > 0 for v in stages.values())
    assert "| evaluation | 3 |" in (out / "timings.md").read_text()
    assert (out / "frontier" / "frontier.png").stat().st_size > 10_000
    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and again.stdout.count("skipped") == 5, again.stdout
    print(f"driver smoke: {time.perf_counter() - t0:.0f} s")


def test_frontier_final_directory_without_checkpoints_takes_the_last_logged_step(tmp_path):
    run = tmp_path / "ipo"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({**DPO_CFG, "loss_type": ["ipo"], "beta": 0.5}))
    (run / "metrics.jsonl").write_text(
        "".join(
            json.dumps(r) + "\n"
            for r in [{"step": 10, "loss": 1.0}, {"step": 20, "loss": 0.5}, {"step": 20, "eval/loss": 0.6}]
        )
    )
    (run / "eval.json").write_text(json.dumps(eval_result(0.3, 1.5, model=str(run))))
    out = tmp_path / "f"
    assert main(["frontier", f"inputs={run / 'eval.json'}", f"output_dir={out}"]) == 0
    (p,) = json.loads((out / "frontier.json").read_text())["points"]
    assert (p["method"], p["setting"], p["step"], p["run"]) == ("ipo", "beta=0.5", 20, str(run.resolve()))
