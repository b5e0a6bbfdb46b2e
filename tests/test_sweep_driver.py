"""examples/sentiment/sweep.py, the issue-16 sweep driver: its plan and what it counts as done (fast), and
end to end at --smoke sizes on a tiny model (slow: ten runs, ~6 min on two cores): every run trained,
every checkpoint evaluated into the results directory with its command and wall time, the frontier
with its verdict drawn from the results alone, and a second invocation that redoes nothing."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

DRIVER = str(ROOT / "examples" / "sentiment" / "sweep.py")
RUNS = [  # in the order they start
    "pairs",
    "reference",
    "rloo-target4.4",
    "dpo-beta0.1",
    "dpo-beta0.5",
    "dpo-beta2",
    "rm",
    "rloo-target1.3",
    "rloo-target2.7",
    "ppo-target2.7",
    "rloo-rm-target2.7",
]


def driver(*args, timeout=60):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(
        [sys.executable, DRIVER, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_sweep_plan_and_done_runs_are_skipped(tmp_path):
    results = tmp_path / "results"
    proc = driver("--dry-run", "--out", str(tmp_path / "out"), "--results", str(results))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert [line.split()[0] for line in lines] == RUNS
    assert all("to do" in line for line in lines)
    plan = dict(zip(RUNS, lines))
    assert "beta=2 " in plan["dpo-beta2"] and "configs/sweep/dpo.yaml" in plan["dpo-beta2"]
    assert "kl_coef=0.05 target_kl=4.4" in plan["rloo-target4.4"]
    assert "algorithm=ppo value_lr=1e-4 critic_warmup_steps=10" in plan["ppo-target2.7"]
    assert f"reward=rm:{tmp_path / 'out' / 'seed0' / 'rm'}" in plan["rloo-rm-target2.7"]
    (results / "dpo-beta2").mkdir(parents=True)
    (results / "dpo-beta2" / "run.json").write_text(json.dumps({"done": True}))
    proc = driver("--dry-run", "--out", str(tmp_path / "out"), "--results", str(results))
    assert [line.split()[1] for line in proc.stdout.splitlines()] == [
        "done" if r == "dpo-beta2" else "to" for r in RUNS
    ]
    record = {"done": True, "machine": "m", "seconds": {"train": 600.0, "eval checkpoint-26": 120.0, "eval c-52": 180}}
    (results / "dpo-beta2" / "run.json").write_text(json.dumps(record))
    times = driver("--times", "--out", str(tmp_path / "out"), "--results", str(results)).stdout
    assert "| dpo-beta2 | m | 10.0 min | 2 x 2.5 = 5.0 min | 15.0 min |" in times
    assert "| rm | | not run yet | | |" in times and "**0.25 h**" in times
    bad = driver("--dry-run", "--only", "nope", "--results", str(results))
    assert bad.returncode != 0 and "no run named nope" in bad.stderr


@pytest.mark.slow
def test_sweep_end_to_end_at_smoke_sizes(tiny_model_dir, tmp_path):
    out, results = tmp_path / "out", tmp_path / "results"
    args = ["--smoke", "--model", str(tiny_model_dir), "--out", str(out), "--results", str(results)]
    proc = driver(*args, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for run in RUNS:
        where = tmp_path / "pairs" if run == "pairs" else results / run  # the pairs are shared by the seeds
        record = json.loads((where / "run.json").read_text())
        assert record["done"] and record["commands"] and all(s > 0 for s in record["seconds"].values())
        if run == "pairs":  # 16 prompts x 2 samples, labelled by length: a pair per prompt but for ties
            rows = [json.loads(line) for line in (where / "train.jsonl").read_text().splitlines()]
            assert record["pairs"] == len(rows) >= 8 and all(r["score_chosen"] > r["score_rejected"] for r in rows)
            assert (
                "dataset=" + os.path.relpath(where / "train.jsonl", ROOT) in (results / "rm" / "run.json").read_text()
            )
        elif run not in ("reference", "rm"):
            assert record["checkpoints"] == ["checkpoint-1", "checkpoint-2"]
            for c in record["checkpoints"]:
                assert (results / run / c / "eval.json").is_file() and (
                    results / run / c / "trainer_state.json"
                ).is_file()
    reference = json.loads((results / "reference" / "eval.json").read_text())["reference"]
    assert len(reference["per_prompt"]["reward"]) == 4 and len(reference["rewards_per_prompt"][0]) == 2
    # evaluated checkpoints but a run's newest are removed; their results stay
    assert [p.name for p in (out / "seed0" / "dpo-beta0.1").glob("checkpoint-*")] == ["checkpoint-2"]
    frontier = json.loads((results / "frontier" / "frontier.json").read_text())
    methods = {p["method"] for p in frontier["points"]}
    assert methods == {"dpo", "rloo", "ppo", "rloo-rm"}
    assert len(frontier["points"]) == 16 and frontier["verdict"] and "best_of_n" in frontier
    assert "| 0.5 | dpo |" in (results / "frontier" / "frontier.md").read_text()
    again = driver(*args, timeout=300)
    assert again.returncode == 0 and again.stdout.count("skipped") == len(RUNS), again.stdout


def test_an_interrupted_run_keeps_its_times_and_resumes(tmp_path, monkeypatch):
    """run.json is written as a run goes (done false); a second invocation skips the evaluations already
    written, sums the training time of both and marks the run done."""
    sys.path.insert(0, str(ROOT / "examples" / "sentiment"))
    import sweep

    args = sweep.parse_args(["--out", str(tmp_path / "out"), "--results", str(tmp_path / "results")])
    driver_ = sweep.Sweep(args)
    driver_.reference_ready.set()
    run = next(r for r in sweep.plan(args) if r.name == "dpo-beta2")
    run_dir = Path(args.out) / run.name
    calls = []

    def fake_call(self, run, argv, log):
        calls.append(argv[0])
        if argv[0] == "dpo":
            for step in (26, 52):
                (run_dir / f"checkpoint-{step}").mkdir(parents=True, exist_ok=True)
                (run_dir / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
        else:
            out = next(a.split("=", 1)[1] for a in argv if a.startswith("output_file="))
            if "checkpoint-52" in out and calls.count("eval") == 2:
                raise RuntimeError("killed")  # the first invocation dies in its second evaluation
            Path(out).write_text("{}")
        return "dpokit " + argv[0], 10.0

    monkeypatch.setattr(sweep.Sweep, "call", fake_call)
    with pytest.raises(RuntimeError, match="killed"):
        driver_.execute(run)
    partial = json.loads(driver_.record_path(run).read_text())
    assert not partial["done"] and partial["seconds"] == {"train": 10.0, "eval checkpoint-26": 10.0}
    assert not driver_.done(run)
    driver_.execute(run)
    record = json.loads(driver_.record_path(run).read_text())
    assert record["done"] and record["invocations"] == 2
    assert record["seconds"] == {"train": 20.0, "eval checkpoint-26": 10.0, "eval checkpoint-52": 10.0}
    assert calls == ["dpo", "eval", "eval", "dpo", "eval"]  # checkpoint-26 was not evaluated again
