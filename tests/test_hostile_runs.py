"""Hostile runs: damaged checkpoints, two runs on one output_dir, a full disk, torn metrics, broken
model directories, repeated signals, weights that overflow. Each either falls back correctly (the same
final weights and metrics as an uninterrupted run) or stops with exit 2, one `error:` line naming the
place, no traceback, and nothing half-written.

Runs are in-process (`dpokit.cli.main`), against one trained run directory per module that each case
copies, so the whole file stays well under a minute and a half on two cores."""

import errno
import json
import logging
import os
import shutil
import signal
import socket

import pytest
import torch
from conftest import conversational_rows, write_jsonl
from conftest import one_error_line as one_error

from dpokit import models
from dpokit.cli import main
from dpokit.commands import dpo
from dpokit.errors import Interrupted, UserError
from dpokit.report import read_metrics
from dpokit.train import checkpoint, loop
from dpokit.train.lock import LOCK_NAME, RunLock
from dpokit.train.metrics import truncate_metrics

TIMING_KEYS = {"tokens_per_second", "peak_memory_mb"}


def args(model_dir, data, out, *extra):
    # 16 pairs in batches of 2, 3 steps; a checkpoint after each (checkpoint-3 is the final one)
    return [
        "dpo",
        f"model={model_dir}",
        f"dataset={data}",
        f"output_dir={out}",
        "max_steps=3",
        "per_device_train_batch_size=2",
        "save_steps=1",
        "logging_steps=1",
        "learning_rate=1e-3",
        "max_eval_examples=2",
        "progress_bar=false",
        "seed=3",
        "precision=fp32",
        *extra,
    ]


def metrics(out):
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


def listing(directory):
    """Every path under a directory with its bytes: to assert that nothing was written."""
    return {
        p.relative_to(directory).as_posix(): (p.read_bytes() if p.is_file() else None)
        for p in sorted(directory.rglob("*"))
    }


@pytest.fixture
def cli(capsys, caplog):
    """Run the CLI in-process; returns (exit code, stderr). Log records land in caplog."""
    caplog.set_level(logging.INFO, logger="dpokit")

    def run(argv):
        capsys.readouterr()
        code = main([str(a) for a in argv])
        return code, capsys.readouterr().err

    return run


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    write_jsonl(d / "train.jsonl", conversational_rows(16))
    write_jsonl(d / "test.jsonl", conversational_rows(4))
    return d


@pytest.fixture(scope="module")
def baseline(tiny_model_dir, data, tmp_path_factory):
    """One uninterrupted run, trained once for the module; cases damage copies of it."""
    out = tmp_path_factory.mktemp("baseline") / "run"
    assert main(args(tiny_model_dir, data, out)) == 0
    assert [p.name for p in checkpoint.list_checkpoints(out)] == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    return out


@pytest.fixture
def run_copy(baseline, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(baseline, out)
    return out


def same_as_baseline(out, baseline):
    assert (out / "model.safetensors").read_bytes() == (baseline / "model.safetensors").read_bytes()
    assert metrics(out) == metrics(baseline)
    assert not list(out.glob(".checkpoint-*.tmp")) and not list(out.glob(".final.*.tmp"))
    assert not (out / LOCK_NAME).exists()


# --- damaged checkpoints ----------------------------------------------------------------------------------


def truncate(f):
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def flip_byte(f):
    b = bytearray(f.read_bytes())
    b[len(b) - 100] ^= 0x01  # deep in the weights, past the header: the file still parses
    f.write_bytes(bytes(b))


def edit_step(ckpt):
    state = json.loads((ckpt / "trainer_state.json").read_text())
    state["step"] = 1
    (ckpt / "trainer_state.json").write_text(json.dumps(state))


def edit_data_position(ckpt):  # the step still matches the directory: only the manifest notices
    state = json.loads((ckpt / "trainer_state.json").read_text())
    state["micro_batches"] += 1
    (ckpt / "trainer_state.json").write_text(json.dumps(state))


DAMAGE = {
    "truncated-safetensors": (lambda c: truncate(c / "model.safetensors"), "model.safetensors"),
    "garbage-state-json": (lambda c: (c / "trainer_state.json").write_text("{oops"), "trainer_state.json"),
    "missing-optimizer": (lambda c: (c / "optimizer.pt").unlink(), "optimizer.pt"),
    "flipped-weight-byte": (lambda c: flip_byte(c / "model.safetensors"), "model.safetensors"),
    "edited-step": (edit_step, "trainer_state.json"),
    "edited-data-position": (edit_data_position, "trainer_state.json"),
    "stale-optimizer": (
        lambda c: shutil.copy(c.parent / "checkpoint-2" / "optimizer.pt", c / "optimizer.pt"),
        "optimizer.pt",
    ),
    "missing-manifest": (lambda c: (c / "manifest.json").unlink(), "manifest.json"),
    "garbage-manifest": (lambda c: (c / "manifest.json").write_text("not json"), "manifest.json"),
    "missing-state": (lambda c: (c / "trainer_state.json").unlink(), "trainer_state.json"),
    "truncated-rng": (lambda c: truncate(c / "rng_state.pt"), "rng_state.pt"),
    "missing-weights": (lambda c: (c / "model.safetensors").unlink(), "model.safetensors"),
    "extra-shard": (
        lambda c: shutil.copy(c / "model.safetensors", c / "model-00002-of-00002.safetensors"),
        "model-00002-of-00002.safetensors",
    ),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_verify_names_the_damaged_file(baseline, tmp_path, damage):
    ckpt = tmp_path / "checkpoint-3"
    shutil.copytree(baseline / "checkpoint-3", ckpt)
    (tmp_path / "checkpoint-2").symlink_to(baseline / "checkpoint-2")  # (stale-optimizer reads it)
    assert checkpoint.verify(ckpt) is None
    mutate, culprit = DAMAGE[damage]
    mutate(ckpt)
    problem = checkpoint.verify(ckpt)
    assert problem is not None and culprit in problem, problem


@pytest.mark.parametrize(
    "damage",
    ["truncated-safetensors", "flipped-weight-byte", "edited-data-position", "stale-optimizer", "missing-manifest"],
)
def test_auto_resume_falls_back_past_a_damaged_checkpoint(
    baseline, run_copy, tiny_model_dir, data, cli, caplog, damage
):
    out = run_copy
    DAMAGE[damage][0](out / "checkpoint-3")
    (out / "model.safetensors").unlink()  # as if killed after the last checkpoint, before the final model
    code, err = cli(args(tiny_model_dir, data, out, "resume=auto"))
    assert code == 0, err
    warning = [r.getMessage() for r in caplog.records if "checkpoint-3: damaged" in r.getMessage()]
    assert warning and DAMAGE[damage][1] in warning[0]
    assert "resuming from" in caplog.text and "checkpoint-2 (step 2" in caplog.text
    same_as_baseline(out, baseline)
    assert checkpoint.verify(out / "checkpoint-3") is None  # rewritten whole


@pytest.mark.parametrize("damage", ["truncated-safetensors", "flipped-weight-byte", "missing-optimizer"])
def test_explicit_resume_of_a_damaged_checkpoint_fails_naming_the_file(
    baseline, run_copy, tiny_model_dir, data, cli, tmp_path, damage
):
    DAMAGE[damage][0](run_copy / "checkpoint-2")
    fresh = tmp_path / "fresh"
    code, err = cli(args(tiny_model_dir, data, fresh, f"resume={run_copy / 'checkpoint-2'}"))
    assert code == 2
    one_error(err, run_copy / "checkpoint-2" / DAMAGE[damage][1], "cannot resume")
    assert not fresh.exists()  # nothing written, not even the output_dir


def test_auto_resume_with_every_checkpoint_damaged_fails_writing_nothing(run_copy, tiny_model_dir, data, cli):
    for ckpt in checkpoint.list_checkpoints(run_copy):
        flip_byte(ckpt / "model.safetensors")
    before = listing(run_copy)
    code, err = cli(args(tiny_model_dir, data, run_copy, "resume=auto"))
    assert code == 2
    one_error(err, run_copy, "no checkpoint to resume from is intact", "checkpoint-1", "checkpoint-3")
    assert listing(run_copy) == before


def test_checkpoint_from_before_manifests_is_accepted_with_a_warning(
    baseline, run_copy, tiny_model_dir, data, cli, caplog
):
    for ckpt in checkpoint.list_checkpoints(run_copy):  # what an older dpokit wrote
        (ckpt / "manifest.json").unlink()
        state = json.loads((ckpt / "trainer_state.json").read_text())
        del state["checkpoint_format"]
        (ckpt / "trainer_state.json").write_text(json.dumps(state))
    shutil.rmtree(run_copy / "checkpoint-3")
    code, err = cli(args(tiny_model_dir, data, run_copy, "resume=auto"))
    assert code == 0, err
    assert "written by an older dpokit without manifest.json" in caplog.text
    same_as_baseline(run_copy, baseline)


def test_old_checkpoint_with_a_truncated_optimizer_is_one_error(run_copy, tiny_model_dir, data, cli):
    ckpt = run_copy / "checkpoint-2"
    (ckpt / "manifest.json").unlink()
    state = json.loads((ckpt / "trainer_state.json").read_text())
    del state["checkpoint_format"]
    (ckpt / "trainer_state.json").write_text(json.dumps(state))
    truncate(ckpt / "optimizer.pt")
    code, err = cli(args(tiny_model_dir, data, run_copy, f"resume={ckpt}"))
    assert code == 2
    one_error(err, ckpt, "cannot load checkpoint")


# --- one writer per output_dir ----------------------------------------------------------------------------


def test_second_run_on_a_locked_output_dir_fails_before_writing(run_copy, tiny_model_dir, data, cli):
    before = listing(run_copy)
    with RunLock(run_copy):  # a live run holds it (flock: another open file is refused, even in this process)
        code, err = cli(args(tiny_model_dir, data, run_copy, "resume=auto"))
        assert code == 2
        one_error(err, run_copy, f"in use by another dpokit run (pid {os.getpid()} on host {socket.gethostname()}")
        after = listing(run_copy)
    assert {k: v for k, v in after.items() if k != LOCK_NAME} == before


def test_run_lock_refuses_a_second_holder_and_frees_on_release(tmp_path):
    out = tmp_path / "fresh" / "run"
    with RunLock(out):
        owner = json.loads((out / LOCK_NAME).read_text())
        assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname() and owner["started"]
        with pytest.raises(UserError, match=f"{out}: output_dir is in use by another dpokit run .pid {os.getpid()}"):
            RunLock(out).acquire()
    assert not (out / LOCK_NAME).exists()
    RunLock(out).acquire().release()


class Hook:
    """Wraps the DPO step: calls `action` once, at the given (1-based) training call."""

    def __init__(self, step, at, action):
        self.step, self.at, self.action, self.calls = step, at, action, 0

    def __call__(self, model, batch):
        if model.training:
            self.calls += 1
            if self.calls == self.at:
                self.action()
        return self.step(model, batch)


@pytest.fixture
def hook(monkeypatch):
    """hook(at, action) wraps every DPOStep built from now on; hook(None) removes the wrapper."""
    real = dpo.DPOStep

    def install(at, action=None):
        monkeypatch.setattr(dpo, "DPOStep", real if at is None else lambda *a, **k: Hook(real(*a, **k), at, action))

    return install


def test_concurrent_second_run_is_refused_and_the_first_is_untouched(
    baseline, tiny_model_dir, data, cli, tmp_path, hook, capsys
):
    out, seen = tmp_path / "run", {}

    def second_run():  # while the first trains step 2, a second process of the same command starts
        seen["code"] = main(args(tiny_model_dir, data, out))
        seen["err"] = capsys.readouterr().err

    hook(2, second_run)
    code, err = cli(args(tiny_model_dir, data, out))
    assert code == 0, err
    assert seen["code"] == 2
    one_error(seen["err"], out, "in use by another dpokit run", f"pid {os.getpid()}")
    same_as_baseline(out, baseline)


def test_stale_lock_of_a_dead_process_is_taken_over(baseline, run_copy, tiny_model_dir, data, cli, caplog):
    import subprocess
    import sys

    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True
    )
    pid = int(dead.stdout)
    (run_copy / LOCK_NAME).write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "started": "then"}))
    (run_copy / "model.safetensors").unlink()
    code, err = cli(args(tiny_model_dir, data, run_copy, "resume=auto"))
    assert code == 0, err
    assert f"taking over a stale lock of pid {pid}" in caplog.text
    same_as_baseline(run_copy, baseline)


def test_lock_is_released_when_the_run_fails(run_copy, tiny_model_dir, data, cli, monkeypatch):
    monkeypatch.setattr(loop, "all_finite", lambda params: False)
    code, err = cli(args(tiny_model_dir, data, run_copy))
    assert code == 2
    one_error(err, "stopped at step 1")
    assert not (run_copy / LOCK_NAME).exists()
    with RunLock(run_copy):  # free again
        pass


# --- a full disk while saving -----------------------------------------------------------------------------


def fail_in(path_part, exc):
    def check(path):
        if path_part in str(path):
            raise exc

    return check


def raising_torch_save(real):
    def save(obj, f, *a, **k):
        fail_in(
            "checkpoint-2",
            RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos (No space left on device)"),
        )(f)
        return real(obj, f, *a, **k)

    return save


def patch_model_writer(monkeypatch, path_part, exc):
    real = models.save_model

    def save(model, tokenizer, out_dir, merge_lora=False):
        fail_in(path_part, exc)(out_dir)
        return real(model, tokenizer, out_dir, merge_lora)

    monkeypatch.setattr(models, "save_model", save)


def patch_tokenizer_writer(monkeypatch, path_part, exc):
    from transformers import PreTrainedTokenizerBase

    real = PreTrainedTokenizerBase.save_pretrained

    def save(self, save_directory, *a, **k):
        fail_in(path_part, exc)(save_directory)
        return real(self, save_directory, *a, **k)

    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", save)


def patch_manifest_writer(monkeypatch, path_part, exc):
    real = checkpoint.write_manifest

    def write(directory):
        fail_in(path_part, exc)(directory)
        return real(directory)

    monkeypatch.setattr(checkpoint, "write_manifest", write)


def safetensor_error():
    from safetensors import SafetensorError

    return SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })")


WRITERS = {
    "torch-save-RuntimeError": lambda mp: mp.setattr(checkpoint.torch, "save", raising_torch_save(torch.save)),
    "safetensors-SafetensorError": lambda mp: patch_model_writer(mp, "checkpoint-2", safetensor_error()),
    "tokenizer-OSError": lambda mp: patch_tokenizer_writer(
        mp, "checkpoint-2", OSError(errno.ENOSPC, "No space left on device")
    ),
    "manifest-OSError": lambda mp: patch_manifest_writer(
        mp, "checkpoint-2", OSError(errno.ENOSPC, "No space left on device")
    ),
}


@pytest.mark.parametrize("writer", list(WRITERS))
def test_disk_full_during_a_checkpoint_keeps_the_previous_one(tiny_model_dir, data, cli, tmp_path, monkeypatch, writer):
    WRITERS[writer](monkeypatch)
    out = tmp_path / "run"
    code, err = cli(args(tiny_model_dir, data, out))
    assert code == 2
    one_error(err, out / "checkpoint-2", "cannot write checkpoint", "the previous checkpoint is intact")
    assert [p.name for p in checkpoint.list_checkpoints(out)] == ["checkpoint-1"]
    assert checkpoint.verify(out / "checkpoint-1") is None
    assert not list(out.glob(".checkpoint-*.tmp")) and not (out / LOCK_NAME).exists()


def test_disk_full_during_the_final_save_then_resume(baseline, tiny_model_dir, data, cli, tmp_path, monkeypatch):
    out = tmp_path / "run"
    with monkeypatch.context() as mp:
        patch_model_writer(mp, ".final.", safetensor_error())
        code, err = cli(args(tiny_model_dir, data, out))
    assert code == 2
    one_error(err, out, "cannot write the final model", "checkpoint-3 is intact")
    assert not (out / "model.safetensors").exists() and not list(out.glob(".final.*.tmp"))
    code, err = cli(args(tiny_model_dir, data, out, "resume=auto"))  # resumes at the final step
    assert code == 0, err
    same_as_baseline(out, baseline)


def test_final_save_replaces_an_earlier_models_shards(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    for stale in ("model-00001-of-00002.safetensors", "model.safetensors.index.json", "metrics.jsonl"):
        (out / stale).write_text("old")

    def write(d):
        (d / "model.safetensors").write_text("new")
        return "merged"

    assert checkpoint.save_final(out, write) == "merged"
    assert sorted(p.name for p in out.iterdir()) == ["metrics.jsonl", "model.safetensors"]
    assert (out / "model.safetensors").read_text() == "new"


# --- metrics.jsonl across kills ---------------------------------------------------------------------------


def test_torn_last_metrics_line_is_dropped_on_resume(baseline, run_copy, tiny_model_dir, data, cli, caplog):
    shutil.rmtree(run_copy / "checkpoint-3")
    (run_copy / "model.safetensors").unlink()
    with open(run_copy / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "epoch": 0.375, "loss": 0.69')  # killed mid-write
    code, err = cli(args(tiny_model_dir, data, run_copy, "resume=auto"))
    assert code == 0, err
    assert "line" in caplog.text and "torn by a kill mid-write" in caplog.text
    same_as_baseline(run_copy, baseline)


def test_resume_at_the_final_step_writes_no_duplicate_rows(baseline, run_copy, tiny_model_dir, data, cli):
    (run_copy / "model.safetensors").unlink()  # killed after the final checkpoint, before the final model
    code, err = cli(args(tiny_model_dir, data, run_copy, "resume=auto"))
    assert code == 0, err
    same_as_baseline(run_copy, baseline)


def test_truncate_metrics_keeps_rows_up_to_the_step(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    rows = [
        {"step": 0, "eval/loss": 1.0},
        {"step": 2, "loss": 0.9},
        {"step": 4, "loss": 0.8},
        {"step": 4, "eval/loss": 0.7},
        {"step": 6, "loss": 0.6},
    ]
    text = "".join(json.dumps(r) + "\n" for r in rows)
    path.write_text(text + "{oops\n" + '{"step": 7, "lo')
    truncate_metrics(path, 4, drop_eval=True)
    assert [json.loads(x) for x in path.read_text().splitlines()] == rows[:3]
    assert "line 6 is not a metrics row (damaged)" in caplog.text and "line 7" in caplog.text


def test_read_metrics_leaves_out_a_torn_line(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "lo')
    assert read_metrics(path) == [{"step": 1, "loss": 0.5}]
    assert "line 2 is not JSON" in caplog.text


# --- model directories that are not models --------------------------------------------------------------


def edit_config(**kw):
    def f(d):
        cfg = json.loads((d / "config.json").read_text())
        cfg.update(kw)
        (d / "config.json").write_text(json.dumps(cfg))

    return f


BAD_MODELS = {
    "unknown-model-type": (edit_config(model_type="nonexistent"), "nonexistent"),
    "needs-remote-code": (
        edit_config(model_type="custom_thing", auto_map={"AutoConfig": "c.Config", "AutoModelForCausalLM": "m.Model"}),
        "trust_remote_code=true",
    ),
    "truncated-weights": (lambda d: truncate(d / "model.safetensors"), "cannot load model"),
    "garbage-weights": (lambda d: (d / "model.safetensors").write_bytes(b"\x00" * 64), "cannot load model"),
    "missing-weights": (lambda d: (d / "model.safetensors").unlink(), "cannot load model"),
    "missing-config": (lambda d: (d / "config.json").unlink(), "not a model directory (no config.json)"),
    "config-not-json": (lambda d: (d / "config.json").write_text("{model_type: llama"), "cannot load"),
    "not-a-model-dir": (
        lambda d: [p.unlink() for p in d.iterdir()] and write_jsonl(d / "train.jsonl", []),
        "not a model directory",
    ),
}


@pytest.mark.parametrize("case", list(BAD_MODELS))
def test_bad_model_directory_is_one_error(tiny_model_dir, data, cli, tmp_path, case):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    mutate, expected = BAD_MODELS[case]
    mutate(model)
    out = tmp_path / "out"
    code, err = cli(args(model, data, out))
    assert code == 2
    one_error(err, f"error: {model}: ", expected)
    assert not out.exists()


def test_a_file_that_is_not_a_model_is_one_error(data, cli, tmp_path):
    out = tmp_path / "out"
    code, err = cli(args(data / "train.jsonl", data, out))
    assert code == 2
    one_error(err, f"{data / 'train.jsonl'}: not a model")
    assert not out.exists()


# --- signals ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_second_signal_stops_at_once_with_its_own_code(baseline, tiny_model_dir, data, cli, tmp_path, hook, sig, code):
    out = tmp_path / "run"
    hook(2, lambda: (os.kill(os.getpid(), sig), os.kill(os.getpid(), sig)))
    got, err = cli(args(tiny_model_dir, data, out))
    assert got == code, err
    assert f"second {sig.name}" in err and "Traceback" not in err
    assert [p.name for p in checkpoint.list_checkpoints(out)] == ["checkpoint-1"]  # no save after the 2nd
    assert not (out / LOCK_NAME).exists()
    if sig != signal.SIGTERM:
        return
    hook(None)
    got, err = cli(args(tiny_model_dir, data, out, "resume=auto"))
    assert got == 0, err
    same_as_baseline(out, baseline)


def test_stop_signal_unit_codes():
    with pytest.raises(Interrupted) as e, loop.StopSignal():
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)
    assert e.value.exit_code == 143 and "second SIGTERM" in str(e.value)


# --- weights that overflow ------------------------------------------------------------------------------


def test_weights_made_nonfinite_by_the_optimizer_are_never_saved(tiny_model_dir, data, cli, tmp_path, monkeypatch):
    real_step = torch.optim.AdamW.step
    calls = {"n": 0}

    def step(self, *a, **k):  # finite gradients, but the update overflows at step 2
        out = real_step(self, *a, **k)
        calls["n"] += 1
        if calls["n"] == 2:
            with torch.no_grad():
                self.param_groups[0]["params"][0].mul_(float("inf"))
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    out = tmp_path / "run"
    code, err = cli(args(tiny_model_dir, data, out))
    assert code == 2
    one_error(err, "stopped at step 2", "weights non-finite", f"last good checkpoint: {out / 'checkpoint-1'}")
    assert [p.name for p in checkpoint.list_checkpoints(out)] == ["checkpoint-1"]
    assert not (out / "model.safetensors").exists()


def test_huge_learning_rate_stops_before_saving(tiny_model_dir, data, cli, tmp_path):
    out = tmp_path / "run"  # RMSprop's first update is about 10 x learning_rate: past float32's 3.4e38
    code, err = cli(args(tiny_model_dir, data, out, "optimizer=rmsprop", "learning_rate=1e38"))
    assert code == 2
    one_error(err, "stopped at step 1", "weights non-finite", "last good checkpoint: none")
    assert checkpoint.list_checkpoints(out) == [] and not (out / "model.safetensors").exists()


def test_learning_rate_beyond_float32_is_one_error(tiny_model_dir, data, cli, tmp_path):
    out = tmp_path / "run"
    code, err = cli(args(tiny_model_dir, data, out, "learning_rate=1e39"))
    assert code == 2
    one_error(err, "key 'learning_rate': 1e+39 does not fit in float32")
    assert not out.exists()


# --- file modes -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_checkpoint_directories_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        out = tmp_path / "run"
        out.mkdir()
        model = torch.nn.Linear(2, 2)
        opt = torch.optim.AdamW(model.parameters())

        def write(d):
            from safetensors.torch import save_file

            save_file(model.state_dict(), str(d / "model.safetensors"))

        path = checkpoint.save_checkpoint(out, 1, write, opt, {})
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == out.stat().st_mode & 0o777 == 0o777 & ~umask
    assert (path / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask
    assert checkpoint.verify(path) is None
