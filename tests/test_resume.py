"""Fault tolerance: a real training process SIGKILLed before the first checkpoint, during a save and
mid-epoch resumes to bitwise-identical weights and the same metrics; SIGTERM checkpoints and exits;
non-finite steps are skipped and stop the run when they persist; disk problems fail clearly."""

import errno
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from dpokit.commands import dpo
from dpokit.commands.dpo import DPOConfig
from dpokit.errors import UserError
from dpokit.train import checkpoint, loop

TIMING_KEYS = {"tokens_per_second", "peak_memory_mb"}


def common(model_dir, data_dir, out):
    # 16 pairs, batches of 2: 8 micro-batches an epoch, 12 steps = 1.5 epochs; checkpoints every 3 steps
    return [
        "dpo",
        f"model={model_dir}",
        f"dataset={data_dir}",
        f"output_dir={out}",
        "max_steps=12",
        "per_device_train_batch_size=2",
        "save_steps=3",
        "logging_steps=2",
        "learning_rate=1e-3",
        "max_eval_examples=2",
        "progress_bar=false",
        "seed=3",
    ]


def run(args, env_extra=None):
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "dpokit.cli", *args], capture_output=True, text=True, env=env)


def metrics(out):
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


@pytest.fixture(scope="module")
def baseline(tiny_model_dir, tmp_path_factory):
    from conftest import conversational_rows, write_jsonl

    data = tmp_path_factory.mktemp("data")
    write_jsonl(data / "train.jsonl", conversational_rows(16))
    write_jsonl(data / "test.jsonl", conversational_rows(4))
    out = tmp_path_factory.mktemp("baseline") / "run"
    r = run(common(tiny_model_dir, data, out))
    assert r.returncode == 0, r.stderr
    return data, out


@pytest.mark.parametrize(
    "kill_at", ["step:2", "save:6", "step:10"], ids=["before-first-checkpoint", "during-save", "mid-epoch"]
)
def test_sigkill_then_resume_is_bitwise_identical(baseline, tiny_model_dir, tmp_path, kill_at):
    data, base = baseline
    out = tmp_path / "run"
    r = run(common(tiny_model_dir, data, out), {"DPOKIT_KILL_AT": kill_at})
    assert r.returncode == -signal.SIGKILL
    complete = checkpoint.list_checkpoints(out)
    if kill_at == "save:6":  # killed mid-save: the half-written checkpoint never became visible
        assert [p.name for p in complete] == ["checkpoint-3"] and list(out.glob(".checkpoint-6.*.tmp"))
    r = run(common(tiny_model_dir, data, out) + ["resume=auto"])
    assert r.returncode == 0, r.stderr
    assert ("resuming from" in r.stderr) == (kill_at != "step:2")
    assert not list(out.glob(".checkpoint-*.tmp"))
    assert (out / "model.safetensors").read_bytes() == (base / "model.safetensors").read_bytes()
    assert metrics(out) == metrics(base)


def test_sigterm_checkpoints_and_exits_cleanly(baseline, tiny_model_dir, tmp_path):
    data, base = baseline
    out = tmp_path / "run"
    args = common(tiny_model_dir, data, out) + ["logging_steps=1"]
    proc = subprocess.Popen([sys.executable, "-m", "dpokit.cli", *args], stderr=subprocess.PIPE, text=True)
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if line.startswith("step=4 "):
            proc.send_signal(signal.SIGTERM)
            break
    rest = proc.stderr.read()
    assert proc.wait(timeout=120) == 143
    assert "Traceback" not in rest and "resume=auto" in rest
    done = checkpoint.list_checkpoints(out)[-1]
    assert int(done.name.split("-")[1]) >= 4
    r = run(args + ["resume=auto"])
    assert r.returncode == 0, r.stderr
    assert (out / "model.safetensors").read_bytes() == (base / "model.safetensors").read_bytes()


def test_resume_refuses_a_different_config(baseline, tiny_model_dir, tmp_path):
    data, _ = baseline
    out = tmp_path / "run"
    assert run(common(tiny_model_dir, data, out), {"DPOKIT_KILL_AT": "step:5"}).returncode == -signal.SIGKILL
    r = run(common(tiny_model_dir, data, out) + ["resume=auto", "beta=0.5"])
    assert r.returncode == 2 and "cannot resume: the config differs in beta" in r.stderr


def test_save_total_limit_keeps_newest(baseline, tiny_model_dir, tmp_path):
    data, _ = baseline
    out = tmp_path / "run"
    r = run(common(tiny_model_dir, data, out) + ["save_total_limit=2"])
    assert r.returncode == 0, r.stderr
    assert [p.name for p in checkpoint.list_checkpoints(out)] == ["checkpoint-9", "checkpoint-12"]
    ckpt = out / "checkpoint-12"
    assert {"model.safetensors", "optimizer.pt", "rng_state.pt", "trainer_state.json", "config.json"} <= {
        p.name for p in ckpt.iterdir()
    }
    torch.load(ckpt / "optimizer.pt", weights_only=True)  # no pickled objects
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["step"] == 12 and state["micro_batches"] == 12 and state["config"]["beta"] == 0.1


class NaNAt:
    """Wraps the DPO step: the loss is NaN at the given (1-based) training calls."""

    def __init__(self, step, bad):
        self.step, self.bad, self.calls = step, set(bad), 0

    def __call__(self, model, batch):
        losses, metrics = self.step(model, batch)
        if model.training:
            self.calls += 1
            if self.calls in self.bad:
                losses = losses * float("nan")
        return losses, metrics


def in_process(tiny_model_dir, data, out, bad, **kw):
    cfg = DPOConfig(
        model=str(tiny_model_dir),
        dataset=str(data),
        output_dir=str(out),
        max_steps=6,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        logging_steps=1,
        progress_bar=False,
        save_steps=2,
        **kw,
    )
    real = dpo.DPOStep
    dpo.DPOStep = lambda *a, **k: NaNAt(real(*a, **k), bad)
    try:
        return dpo.dpo(cfg).model
    finally:
        dpo.DPOStep = real


def test_nonfinite_step_is_skipped(baseline, tiny_model_dir, tmp_path):
    data, _ = baseline
    in_process(tiny_model_dir, data, tmp_path / "o", bad=[2])
    rows = [json.loads(x) for x in (tmp_path / "o" / "metrics.jsonl").read_text().splitlines()]
    skipped = [r for r in rows if "skipped" in r]
    assert [r["step"] for r in skipped] == [2]
    assert all(r["loss"] == r["loss"] for r in rows if "loss" in r and "skipped" not in r)  # no NaN leaked
    assert (tmp_path / "o" / "model.safetensors").exists()


def test_persistent_nonfinite_stops_with_last_good_checkpoint(baseline, tiny_model_dir, tmp_path):
    data, _ = baseline
    with pytest.raises(UserError, match=r"stopped at step 5: 3 steps in a row .* last good checkpoint: .*checkpoint-2"):
        in_process(tiny_model_dir, data, tmp_path / "o", bad=[3, 4, 5, 6])
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path / "o")] == ["checkpoint-2"]


def test_unwritable_output_dir_fails_before_training(baseline, tiny_model_dir, tmp_path):
    data, _ = baseline
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    r = run(common(tiny_model_dir, data, blocker / "out"))
    assert r.returncode == 2 and "output_dir is not writable" in r.stderr and "Traceback" not in r.stderr


def test_full_disk_detected_before_training(baseline, tiny_model_dir, tmp_path, monkeypatch):
    data, _ = baseline
    monkeypatch.setattr(loop.shutil, "disk_usage", lambda p: type("U", (), {"free": 1000})())
    with pytest.raises(UserError, match="only 0.00 GiB free, a checkpoint needs"):
        in_process(tiny_model_dir, data, tmp_path / "o", bad=[])
    assert not (tmp_path / "o").exists()


def test_disk_full_during_save_keeps_previous_checkpoint(baseline, tiny_model_dir, tmp_path, monkeypatch):
    data, _ = baseline
    real_save = torch.save

    def failing_save(obj, f, *a, **k):
        if "checkpoint-4" in str(f):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(checkpoint.torch, "save", failing_save)
    with pytest.raises(UserError, match="checkpoint-4: cannot write checkpoint .No space left on device."):
        in_process(tiny_model_dir, data, tmp_path / "o", bad=[])
    out = tmp_path / "o"
    assert [p.name for p in checkpoint.list_checkpoints(out)] == ["checkpoint-2"]
    assert not list(out.glob(".checkpoint-*.tmp"))
