"""The fast paths through the real DPO job: every layout, chunked log-probs and gradient checkpointing
give the padded run's numbers; cached reference log-probs are reused across runs; LoRA trains adapters
against its own base and saves a plain merged model."""

import json
import shutil

import conftest
import pytest
import torch
import yaml
from transformers import AutoConfig, AutoModelForCausalLM

from dpokit import models
from dpokit.commands import dpo
from dpokit.commands.dpo import DPOConfig
from dpokit.logprobs import auto_chunk_size


def run_dpo(tiny_model_dir, pref_dir, out, **kw):
    """fp32 unless told otherwise: the fast paths give the padded run's numbers to fp32 rounding; under bf16
    (what precision=auto picks on a CPU with avx512_bf16) layouts round differently."""
    kw = {"optimizer": "rmsprop", "max_steps": 3, "precision": "fp32", **kw}
    return conftest.run_dpo(tiny_model_dir, pref_dir, out, **kw).model


def train_rows(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]


@pytest.fixture(scope="module")
def padded_run(tiny_model_dir, tmp_path_factory):
    from conftest import conversational_rows, write_jsonl

    d = tmp_path_factory.mktemp("prefs")
    write_jsonl(d / "train.jsonl", conversational_rows(16))
    write_jsonl(d / "test.jsonl", conversational_rows(8))
    out = tmp_path_factory.mktemp("padded") / "run"
    run_dpo(tiny_model_dir, d, out, **PADDED)
    return d, out


# every layout switch off: the padded layout with full logits, the baseline the fast paths must equal
PADDED = {"padding_free": False, "prefix_sharing": False, "logprob_chunk_size": None}


def test_defaults_are_the_fast_layout(padded_run, tiny_model_dir, tmp_path, monkeypatch):
    """`dpokit dpo` with no layout key: prefix-shared packed batches, chunked log-probs sized from the
    vocabulary (recorded resolved in config.yaml)."""
    monkeypatch.setenv("DPOKIT_CACHE", str(tmp_path / "cache"))
    data, _ = padded_run
    layouts, chunks = [], []
    real_collate, real_logps = dpo.collate_with_reference, dpo.DPOStep.sequence_logps

    def collate(pairs, collate):
        batch = real_collate(pairs, collate)
        layouts.append(batch["layout"])
        return batch

    def logps(self, tokens, B):
        chunks.append(self.chunk_size)
        return real_logps(self, tokens, B)

    monkeypatch.setattr(dpo, "collate_with_reference", collate)
    monkeypatch.setattr(dpo.DPOStep, "sequence_logps", logps)
    run_dpo(tiny_model_dir, data, tmp_path / "o")
    assert layouts and set(layouts) == {"prefix_shared_packed"}
    vocab = AutoConfig.from_pretrained(tiny_model_dir).vocab_size  # 49,152: 2^26 / V = 1365 -> 1024
    assert chunks and set(chunks) == {1024} == {auto_chunk_size(vocab)}
    assert yaml.safe_load((tmp_path / "o" / "config.yaml").read_text())["logprob_chunk_size"] == 1024


def test_auto_chunk_size_from_the_vocabulary():
    # the largest power of two with chunk * V <= 2^26, within [128, 4096]
    assert [auto_chunk_size(v) for v in (32_000, 49_152, 128_256, 256_000, 1_000, 10**7)] == [
        2048,
        1024,
        512,
        256,
        4096,
        128,
    ]
    for v in (32_000, 49_152, 128_256, 151_936):
        assert auto_chunk_size(v) * v <= 2**26 < 2 * auto_chunk_size(v) * v


def test_automatic_chunking_turns_itself_off_where_it_cannot_apply(tiny_model_dir):
    from dpokit.commands.dpo import DPOConfig, resolve_layout
    from dpokit.models import load_model

    model = load_model(str(tiny_model_dir))
    auto = DPOConfig(dataset="x")
    assert resolve_layout(auto, model).logprob_chunk_size == 1024
    assert resolve_layout(DPOConfig(dataset="x", use_weighting=True), model).logprob_chunk_size is None
    lora_head = DPOConfig(dataset="x", use_lora=True, lora_target_modules=["q_proj", "lm_head"])
    assert resolve_layout(lora_head, model).logprob_chunk_size is None
    assert resolve_layout(DPOConfig(dataset="x", logprob_chunk_size=None), model).logprob_chunk_size is None
    assert resolve_layout(DPOConfig(dataset="x", logprob_chunk_size=7), model).logprob_chunk_size == 7


@pytest.mark.parametrize(
    "switches",
    [
        {"padding_free": True},
        {"prefix_sharing": True},
        {"padding_free": True, "prefix_sharing": True},
        {"logprob_chunk_size": 7},
        {"padding_free": True, "logprob_chunk_size": 5},
        {"gradient_checkpointing": True},
        {"precompute_ref_log_probs": True},
        {},  # the defaults: the fast layout with an automatic chunk size
    ],
    ids=lambda s: "+".join(s) or "defaults",
)
def test_fast_path_matches_padded_run(padded_run, tiny_model_dir, tmp_path, switches, monkeypatch):
    monkeypatch.setenv("DPOKIT_CACHE", str(tmp_path / "cache"))
    data, padded = padded_run
    run_dpo(tiny_model_dir, data, tmp_path / "o", **(switches and {**PADDED, **switches}))
    for a, b in zip(train_rows(tmp_path / "o"), train_rows(padded)):
        for key in ("loss", "rewards/margins", "logps/chosen", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), key


def test_precomputed_reference_is_cached_across_a_beta_sweep(padded_run, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("DPOKIT_CACHE", str(tmp_path / "cache"))
    data, _ = padded_run
    references = []
    real_step = dpo.DPOStep
    monkeypatch.setattr(dpo, "DPOStep", lambda ref, *a: references.append(ref) or real_step(ref, *a))
    run_dpo(tiny_model_dir, data, tmp_path / "b1", precompute_ref_log_probs=True, beta=0.1)
    files = list((tmp_path / "cache" / "ref_logps").iterdir())
    assert len(files) == 1 and references == [None]  # no reference model in memory while training
    stamp = files[0].stat().st_mtime_ns
    calls = []
    real_compute = dpo.refcache.pair_logps
    monkeypatch.setattr(dpo.refcache, "pair_logps", lambda *a, **k: calls.append(1) or real_compute(*a, **k))
    run_dpo(tiny_model_dir, data, tmp_path / "b2", precompute_ref_log_probs=True, beta=0.5)
    assert calls == [1]  # held-out pairs only; the training pairs came from the cache
    assert list((tmp_path / "cache" / "ref_logps").iterdir()) == files and files[0].stat().st_mtime_ns == stamp
    run_dpo(tiny_model_dir, data, tmp_path / "b3", precompute_ref_log_probs=True, max_length=40)
    assert len(list((tmp_path / "cache" / "ref_logps").iterdir())) == 2  # other tokenization: another key


@pytest.mark.parametrize("layout", [{}, {"padding_free": True, "prefix_sharing": True}], ids=["padded", "shared"])
def test_precomputed_reference_under_bf16(padded_run, tiny_model_dir, tmp_path, monkeypatch, layout):
    """bf16 with the reference precomputed: held-out pairs are cached in the evaluation's own batches, so
    the first evaluation (policy = pi_ref) gives exactly zero rewards; training's random batches round
    a little differently in bf16, so the first step's rewards are near zero, not exactly zero (see
    refcache's docstring for the bound on a real model)."""
    monkeypatch.setenv("DPOKIT_CACHE", str(tmp_path / "cache"))
    data, _ = padded_run
    out = tmp_path / "bf16"
    run_dpo(
        tiny_model_dir,
        data,
        out,
        precision="bf16",
        precompute_ref_log_probs=True,
        max_steps=1,
        per_device_eval_batch_size=3,
        eval_steps=1,
        **layout,
    )
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    first_eval = next(r for r in rows if "eval/rewards/margins" in r)
    assert first_eval["eval/rewards/chosen"] == first_eval["eval/rewards/rejected"] == 0.0
    first_step = train_rows(out)[0]
    assert abs(first_step["rewards/chosen"]) < 1e-3 and abs(first_step["rewards/rejected"]) < 1e-3


def test_lora_trains_against_its_base_and_saves_a_merged_model(padded_run, tiny_model_dir, tmp_path):
    data, _ = padded_run
    out = tmp_path / "lora"
    run_dpo(tiny_model_dir, data, out, use_lora=True, lora_r=4, lora_target_modules=["q_proj", "v_proj"], save_steps=2)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["eval/rewards/margins"] == 0.0  # pi_ref is the base: identical before training
    assert rows[-1]["eval/loss"] < rows[0]["eval/loss"]
    assert not (out / "adapter_config.json").exists()  # a plain model: loads without peft
    merged = AutoModelForCausalLM.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    changed = [n for n, p in merged.named_parameters() if not torch.equal(p, dict(base.named_parameters())[n])]
    assert changed and all("q_proj" in n or "v_proj" in n for n in changed)
    assert (out / "checkpoint-2" / "adapter_model.safetensors").is_file()
    # resume from the adapter checkpoint: the same merged model
    shutil.copytree(out / "checkpoint-2", tmp_path / "ckpt")
    run_dpo(
        tiny_model_dir,
        data,
        tmp_path / "resumed",
        use_lora=True,
        lora_r=4,
        lora_target_modules=["q_proj", "v_proj"],
        save_steps=2,
        resume=str(tmp_path / "ckpt"),
    )
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "resumed")
    assert all(torch.equal(p, dict(again.named_parameters())[n]) for n, p in merged.named_parameters())


def test_lora_reference_is_the_base_with_adapters_disabled(tiny_model_dir):
    from dpokit.config import load_config

    cfg = load_config(DPOConfig, None, ["dataset=x", "use_lora=true", "lora_r=2"])
    policy = models.add_lora(models.load_model(str(tiny_model_dir)), cfg)
    assert (
        sum(p.numel() for p in policy.parameters() if p.requires_grad)
        < sum(p.numel() for p in policy.parameters()) / 10
    )
