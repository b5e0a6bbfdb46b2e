"""parallelism=fsdp (train/parallel.py) on CPU: 2 gloo processes, the tiny model, fp32.

Every number is checked against an independent computation: the same run in one plain process (no
torchrun, no sharding), which sees the same examples per optimizer step (rank r takes order[r::2],
train/order.py) and whose gradient is the same mean over the step's examples."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from conftest import conversational_rows, write_jsonl
from safetensors.torch import load_file

REL = 1e-5
PER1, ACC2 = ["per_device_train_batch_size=1"], ["gradient_accumulation_steps=2"]


def common(model, data, out, *extra):
    return [
        f"model={model}",
        f"dataset={data}",
        f"output_dir={out}",
        "max_steps=4",
        "logging_steps=1",
        "precision=fp32",
        "learning_rate=1e-3",
        "progress_bar=false",
        "max_eval_examples=3",  # 2 ranks: 2 and 1 held-out pairs (an uneven share, one batch each at a time)
        "per_device_eval_batch_size=1",
        "max_length=64",
        *extra,
    ]


def torchrun(nproc, *args, env=None):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    return subprocess.run(
        [*cmd, "-m", "dpokit.cli", *map(str, args)], capture_output=True, text=True, env=env, timeout=300
    )


def single(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "dpokit.cli", *map(str, args)], capture_output=True, text=True, env=env, timeout=300
    )


def losses(out, key="loss"):
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if key in r]


def assert_rows_match(a, b, keys=("loss", "logps/chosen", "logps/rejected", "rewards/margins", "grad_norm")):
    """Each metric to 1e-5 relative; an implicit reward beta * (log pi - log pi_ref) is a difference of
    log-probs of ~-80 nats, so its tolerance is 1e-5 relative to those (beta 0.1 x 80 x 1e-5 = 8e-5)."""
    assert len(a) == len(b) and a
    for x, y in zip(a, b):
        assert x["step"] == y["step"]
        for k in keys:
            if k not in x:
                continue
            logps = abs(y.get("logps/chosen", y.get("eval/logps/chosen", 0.0)))
            floor = REL * 0.1 * logps if "rewards" in k else 1e-7
            assert x[k] == pytest.approx(y[k], rel=REL, abs=floor), (k, x, y)


def assert_weights_match(dir_a, dir_b):
    wa, wb = load_file(dir_a / "model.safetensors"), load_file(dir_b / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        scale = wb[k].abs().max().clamp(min=1e-6)
        assert ((wa[k] - wb[k]).abs().max() / scale) <= REL, k


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("fsdp-data")
    write_jsonl(d / "train.jsonl", conversational_rows(16))
    write_jsonl(d / "test.jsonl", conversational_rows(4))
    return d


@pytest.fixture(scope="module")
def one_process(tiny_model_dir, data, tmp_path_factory):
    """The reference run: one plain process, 4 pairs per step as 2 micro-batches of 2."""
    out = tmp_path_factory.mktemp("one") / "run"
    args = common(tiny_model_dir, data, out, "per_device_train_batch_size=2", "gradient_accumulation_steps=2")
    r = single("dpo", *args)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def test_fsdp_two_processes_match_one_process(tiny_model_dir, data, one_process, tmp_path):
    """2 ranks x 1 pair x 2 micro-batches (fsdp) = 1 process x 2 pairs x 2 micro-batches: the same
    metrics per step and the same final weights, to 1e-5 relative; the final model loads with
    from_pretrained; the checkpoint it leaves resumes in one plain process (2 -> 1)."""
    out = tmp_path / "fsdp"
    args = common(
        tiny_model_dir,
        data,
        out,
        "parallelism=fsdp",
        "per_device_train_batch_size=1",
        "gradient_accumulation_steps=2",
        "save_steps=2",
    )
    r = torchrun(2, "dpo", *args)
    assert r.returncode == 0, r.stderr[-4000:]
    assert_rows_match(losses(out), losses(one_process))
    eval_keys = ("eval/loss", "eval/logps/chosen", "eval/rewards/margins")
    assert_rows_match(losses(out, "eval/loss"), losses(one_process, "eval/loss"), eval_keys)
    assert_weights_match(out, one_process)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    assert sum(p.numel() for p in model.parameters()) > 0
    ckpt = out / "checkpoint-2"
    assert (ckpt / "dcp" / ".metadata").is_file() and (ckpt / "model.safetensors").is_file()
    AutoModelForCausalLM.from_pretrained(ckpt)  # a checkpoint is an HF directory too (for evaluation)
    # 2 -> 1: the checkpoint of step 2, resumed by one plain process with the same global batch
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(ckpt, resumed / "checkpoint-2")
    args = common(tiny_model_dir, data, resumed, "per_device_train_batch_size=2", "gradient_accumulation_steps=2")
    r = single("dpo", *args, "resume=auto")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming from" in r.stderr
    assert_rows_match(losses(resumed), [r for r in losses(one_process) if r["step"] > 2])  # (the steps it ran)
    assert_weights_match(resumed, one_process)


def test_fsdp_without_torchrun_is_one_line(tiny_model_dir, data, tmp_path):
    r = single("dpo", *common(tiny_model_dir, data, tmp_path / "x", "parallelism=fsdp"))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith("error: parallelism=fsdp needs torchrun") and "Traceback" not in r.stderr


@pytest.mark.parametrize(
    "keys, message",
    [
        ({"fsdp_cpu_offload": True}, "key 'fsdp_cpu_offload': applies to parallelism=fsdp only"),
        ({"fsdp_reshard_after_forward": False}, "key 'fsdp_reshard_after_forward': applies to parallelism=fsdp"),
        ({"parallelism": "zero3"}, "key 'parallelism': 'zero3' is not one of ddp, fsdp"),
    ],
)
def test_invalid_combinations(keys, message):
    from dpokit.commands.dpo import DPOConfig
    from dpokit.config import resolve_config
    from dpokit.errors import UserError

    with pytest.raises(UserError, match=message):
        resolve_config(DPOConfig, {"dataset": "x.jsonl", **keys})


def test_resume_refuses_another_global_batch(tmp_path):
    from dpokit.commands.dpo import DPOConfig
    from dpokit.config import resolve_config, to_dict
    from dpokit.errors import UserError
    from dpokit.train.checkpoint import check_resumable

    saved = resolve_config(DPOConfig, {"dataset": "x.jsonl", "per_device_train_batch_size": 2})
    state = {"config": to_dict(saved), "world": 2}  # 2 x 1 x 2 = 4 examples per step
    same = resolve_config(DPOConfig, {"dataset": "x.jsonl", "per_device_train_batch_size": 4})
    check_resumable(same, state, tmp_path, world=1)  # 4 x 1 x 1: allowed
    for world, pd in ((1, 2), (2, 4)):
        other = resolve_config(DPOConfig, {"dataset": "x.jsonl", "per_device_train_batch_size": pd})
        with pytest.raises(UserError, match="global batch"):
            check_resumable(other, state, tmp_path, world=world)


@pytest.mark.slow
def test_ddp_with_accumulation_matches_one_process(tiny_model_dir, data, one_process, tmp_path):
    out = tmp_path / "ddp"
    args = common(tiny_model_dir, data, out, "per_device_train_batch_size=1", "gradient_accumulation_steps=2")
    r = torchrun(2, "dpo", *args)
    assert r.returncode == 0, r.stderr[-4000:]
    assert_rows_match(losses(out), losses(one_process))
    assert_weights_match(out, one_process)


@pytest.mark.slow
def test_fsdp_sigkilled_resumes_to_the_same_weights(tiny_model_dir, data, one_process, tmp_path):
    """Both ranks SIGKILLed right after step 3 (checkpoint-2 written); resume=auto finishes the run."""
    out = tmp_path / "killed"
    args = common(
        tiny_model_dir,
        data,
        out,
        "parallelism=fsdp",
        "per_device_train_batch_size=1",
        "gradient_accumulation_steps=2",
        "save_steps=2",
    )
    r = torchrun(2, "dpo", *args, env={**os.environ, "DPOKIT_KILL_AT": "step:3"})
    assert r.returncode != 0 and (out / "checkpoint-2").is_dir() and not (out / "model.safetensors").exists()
    r = torchrun(2, "dpo", *args, "resume=auto")
    assert r.returncode == 0, r.stderr[-4000:]
    assert_weights_match(out, one_process)
    assert_rows_match(losses(out), losses(one_process))


@pytest.mark.slow
def test_one_process_checkpoint_resumes_on_two_fsdp_ranks(tiny_model_dir, data, one_process, tmp_path):
    """1 -> 2: an unsharded run's checkpoint (safetensors, optimizer.pt) resumed by 2 fsdp ranks."""
    out = tmp_path / "grown"
    out.mkdir()
    args = common(tiny_model_dir, data, out, "per_device_train_batch_size=2", "gradient_accumulation_steps=2")
    r = single("dpo", *args, "save_steps=2")
    assert r.returncode == 0, r.stderr[-3000:]
    for p in out.iterdir():  # keep checkpoint-2 only: the run resumes from there
        if p.name != "checkpoint-2":
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    args = common(
        tiny_model_dir, data, out, "parallelism=fsdp", "per_device_train_batch_size=1", "gradient_accumulation_steps=2"
    )
    r = torchrun(2, "dpo", *args, "save_steps=2", "resume=auto")
    assert r.returncode == 0, r.stderr[-4000:]
    assert_weights_match(out, one_process)


@pytest.mark.slow
@pytest.mark.parametrize(
    "keys, weights",
    [
        (["use_lora=true", "padding_free=true", "gradient_checkpointing=true"], True),
        (["ref_sync_steps=2", "prefix_sharing=true"], True),
        # the chunked head: metrics only (the weights differ by ~1.6e-4 in one tensor between micro-batch
        # sizes in one process alone: Adam magnifies the rounding of near-zero gradients)
        (["logprob_chunk_size=16", "loss_type=ipo"], False),
    ],
    ids=["lora-packed-checkpointing", "trdpo-prefix-shared", "chunked-head"],
)
def test_fsdp_options_match_one_process(tiny_model_dir, data, tmp_path, keys, weights):
    one, sharded = tmp_path / "one", tmp_path / "fsdp"
    r = single("dpo", *common(tiny_model_dir, data, one, "per_device_train_batch_size=2", *ACC2, *keys))
    assert r.returncode == 0, r.stderr[-3000:]
    r = torchrun(2, "dpo", *common(tiny_model_dir, data, sharded, "parallelism=fsdp", *PER1, *ACC2, *keys))
    assert r.returncode == 0, r.stderr[-4000:]
    assert_rows_match(losses(sharded), losses(one))
    if weights:
        assert_weights_match(sharded, one)


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["rloo", "ppo"])
def test_rl_runs_under_fsdp_and_exports_a_plain_model(algorithm, tiny_model_dir, tmp_path):
    """rl reaches fsdp through the same loop: sampling from a sharded policy (every rank generates, a
    collective forward), the reference sharded alike, PPO's value head sharded with the root; the run
    finishes and its final directory loads with from_pretrained."""
    from transformers import AutoModelForCausalLM

    prompts = tmp_path / "prompts.jsonl"
    write_jsonl(prompts, [{"prompt": f"Review number {i}:"} for i in range(8)])
    out = tmp_path / algorithm
    r = torchrun(
        2,
        "rl",
        f"model={tiny_model_dir}",
        f"dataset={prompts}",
        f"output_dir={out}",
        "reward=vader",
        f"algorithm={algorithm}",
        "parallelism=fsdp",
        "precision=fp32",
        "max_steps=2",
        "logging_steps=1",
        "per_device_train_batch_size=2",
        "num_samples_per_prompt=2",
        "max_new_tokens=4",
        "progress_bar=false",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    rows = losses(out, "reward")
    assert len(rows) == 2 and all(abs(row["reward"]) <= 1 for row in rows)
    AutoModelForCausalLM.from_pretrained(out)
