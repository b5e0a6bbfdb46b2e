"""Every loss type through the real DPO job on a tiny model; reference-free losses load no reference;
TR-DPO and BCO keep their state across an exact resume."""

import shutil

import pytest
import torch
from conftest import run_dpo

from dpokit import models
from dpokit.commands import dpo
from dpokit.commands.dpo import LOSS_TYPES, DPOConfig
from dpokit.config import load_config
from dpokit.losses import LOSSES
from dpokit.train import dpo_step


def test_config_knows_every_loss():
    assert set(LOSS_TYPES) == set(LOSSES) | {"kto", "plackett_luce"}


def test_docs_losses_table_is_the_registry():
    """docs/losses.md has one row per registered loss, naming its paper and whether it reads pi_ref."""
    import re
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "losses.md").read_text()
    rows = {m.group(1): m.group(0) for m in re.finditer(r"^\| `([a-z_]+)` \|.*$", doc, flags=re.M)}
    assert set(LOSSES) <= set(rows)
    for name, spec in LOSSES.items():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", rows[name])]  # (not the escaped \| of |y|)
        assert all(arxiv in rows[name] for arxiv in re.findall(r"\d{4}\.\d{5}", spec.paper)), name
        assert cells[4] == ("yes" if spec.needs_reference else "**no**"), name


@pytest.mark.parametrize(
    "loss_type",
    [
        ["ipo"],
        ["hinge"],
        ["robust"],
        ["exo_pair"],
        ["bco_pair"],
        ["aot"],
        ["discopop"],
        ["simpo"],
        ["orpo"],
        ["sigmoid", "sft"],
    ],
)
def test_each_loss_trains(tiny_model_dir, pref_dir, tmp_path, monkeypatch, loss_type):
    loaded, references = [], []
    real_load, real_step = models.load_model, dpo.DPOStep
    monkeypatch.setattr(models, "load_model", lambda *a, **k: loaded.append(a[0]) or real_load(*a, **k))
    monkeypatch.setattr(dpo, "DPOStep", lambda ref, *a: references.append(ref) or real_step(ref, *a))
    kw = {"label_smoothing": 0.1} if loss_type == ["robust"] else {}
    run_dpo(tiny_model_dir, pref_dir, tmp_path / "o", loss_type=loss_type, **kw)
    import json

    rows = [json.loads(x) for x in (tmp_path / "o" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["loss"] == r["loss"] for r in rows if "loss" in r)  # finite
    assert rows[-1]["eval/loss"] < rows[0]["eval/loss"] or loss_type == ["aot"]
    assert len(loaded) == 1  # the policy; the reference is a copy of it, or (reference-free) nothing at all
    assert (references[0] is None) == (loss_type in (["simpo"], ["orpo"]))


def test_reference_free_flag_skips_the_reference(tiny_model_dir, pref_dir, tmp_path, monkeypatch):
    references, real_step = [], dpo.DPOStep
    monkeypatch.setattr(dpo, "DPOStep", lambda ref, *a: references.append(ref) or real_step(ref, *a))
    run_dpo(tiny_model_dir, pref_dir, tmp_path / "o", reference_free=True)
    assert references == [None]


def test_trdpo_hard_sync_copies_the_policy(tiny_model_dir):
    policy = models.load_model(str(tiny_model_dir))
    reference = models.load_model(str(tiny_model_dir))
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(1.0)
    cfg = load_config(DPOConfig, None, ["dataset=x", "ref_sync_steps=2", "ref_sync_alpha=0.25"])
    step = dpo_step.DPOStep(reference, cfg)
    before = [p.clone() for p in reference.parameters()]
    step.after_optimizer_step(1, policy)  # not a sync step
    assert all(torch.equal(a, b) for a, b in zip(before, reference.parameters()))
    step.after_optimizer_step(2, policy)
    for b, r, p in zip(before, reference.parameters(), policy.parameters()):
        assert torch.allclose(r, 0.25 * p + 0.75 * b, atol=1e-6)


def test_resume_with_moving_reference_and_bco_state_is_exact(tiny_model_dir, pref_dir, tmp_path):
    """TR-DPO's reference and BCO's running mean are part of the state: a resumed run matches."""
    kw = dict(loss_type=["bco_pair"], ref_sync_steps=2, ref_sync_alpha=0.5, max_steps=6, save_steps=3)
    run_dpo(tiny_model_dir, pref_dir, tmp_path / "full", **kw)
    shutil.copytree(tmp_path / "full" / "checkpoint-3", tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "reference.safetensors").is_file()
    run_dpo(tiny_model_dir, pref_dir, tmp_path / "resumed", resume=str(tmp_path / "ckpt"), **kw)
    a = (tmp_path / "full" / "model.safetensors").read_bytes()
    b = (tmp_path / "resumed" / "model.safetensors").read_bytes()
    assert a == b


def kto_rows(n):
    from conftest import REVIEWS

    rows = []
    for p, c, r in (REVIEWS * 4)[:n]:
        rows.append(
            {
                "prompt": [{"role": "user", "content": p}],
                "completion": [{"role": "assistant", "content": c}],
                "label": True,
            }
        )
        rows.append(
            {
                "prompt": [{"role": "user", "content": p}],
                "completion": [{"role": "assistant", "content": r}],
                "label": "false",
            }
        )
    return rows


def test_kto_on_unpaired_data(tiny_model_dir, tmp_path):
    import json

    from conftest import write_jsonl

    d = tmp_path / "kto"
    d.mkdir()
    write_jsonl(d / "train.jsonl", kto_rows(8))
    write_jsonl(d / "test.jsonl", kto_rows(4))
    run_dpo(tiny_model_dir, d, tmp_path / "o", loss_type=["kto"], max_steps=4, desirable_weight=1.33)
    rows = [json.loads(x) for x in (tmp_path / "o" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval/loss" in r]
    assert all(k in train[0] for k in ("rewards/chosen", "rewards/rejected", "logps/chosen", "kl"))
    assert evals[-1]["eval/loss"] < evals[0]["eval/loss"]
    assert evals[-1]["eval/rewards/chosen"] > evals[-1]["eval/rewards/rejected"]


def test_kto_bad_label(tiny_model_dir, tmp_path, capsys):
    from conftest import write_jsonl

    from dpokit.cli import main

    rows = kto_rows(2)
    rows[1]["label"] = "maybe"
    path = write_jsonl(tmp_path / "k.jsonl", rows)
    assert (
        main(["dpo", f"model={tiny_model_dir}", f"dataset={path}", "loss_type=kto", f"output_dir={tmp_path / 'o'}"])
        == 2
    )
    assert "k.jsonl: row 2: field 'label': expected true or false, got 'maybe'" in capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir):
    return models.load_model(str(tiny_model_dir))


@pytest.mark.parametrize("reference_free", [False, True])
@pytest.mark.parametrize("loss_type", sorted(LOSSES))
def test_every_loss_with_and_without_reference_free_steps(tiny_model, smol_tokenizer, loss_type, reference_free):
    """The step of every loss x reference_free gives finite losses and gradients, in training and in evaluation
    (bco_pair with reference_free once raised a TypeError at the first step, after output was written)."""
    import copy

    from dpokit.data.batch import collate_padded
    from dpokit.data.tokenize import TokenizedPair

    policy = copy.deepcopy(tiny_model)
    cfg = load_config(
        DPOConfig,
        None,
        [
            "dataset=x",
            f"loss_type={loss_type}",
            f"reference_free={reference_free}",
            "label_smoothing=0.1" if loss_type == "robust" else "beta=0.1",
        ],
    )
    needs_reference = LOSSES[loss_type].needs_reference and not reference_free
    reference = copy.deepcopy(tiny_model).eval() if needs_reference else None
    step = dpo_step.DPOStep(reference, cfg)
    ids = smol_tokenizer("Rate the film.")["input_ids"]
    pairs = [TokenizedPair(ids, [100 + i, 200, 2], [300 + i, 2]) for i in range(3)]
    batch = collate_padded(pairs, smol_tokenizer.pad_token_id)
    policy.train()
    losses, metrics = step(policy, batch)
    assert losses.shape == (3,) and torch.isfinite(losses).all()
    losses.mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in policy.parameters() if p.grad is not None)
    policy.eval()
    with torch.no_grad():
        losses, metrics = step(policy, batch)
    assert torch.isfinite(losses).all() and all(torch.isfinite(v).all() for v in metrics.values())


def test_kto_refuses_reference_free():
    from dpokit.errors import UserError

    with pytest.raises(UserError, match="reference_free': not supported with kto"):
        load_config(DPOConfig, None, ["dataset=x", "loss_type=kto", "reference_free=true"])


def test_lora_policy_weights_are_the_merged_model(tiny_model):
    """TR-DPO with a LoRA policy moves the reference towards W + delta W: the merged model's weights."""
    import copy

    cfg = DPOConfig(dataset="x", use_lora=True, lora_r=4)
    policy = models.add_lora(copy.deepcopy(tiny_model), cfg)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_()  # B starts at zero: give the adapters a real delta
    weights = dpo_step.policy_weights(policy)
    merged = copy.deepcopy(policy).merge_and_unload()
    expected = dict(merged.named_parameters())
    expected.update((k, v) for k, v in merged.named_buffers() if v.is_floating_point())
    plain = dict(tiny_model.named_parameters())
    plain.update((k, v) for k, v in tiny_model.named_buffers() if v.is_floating_point())
    assert weights.keys() == expected.keys() == plain.keys()
    moved = 0
    for name, tensor in expected.items():
        torch.testing.assert_close(weights[name], tensor, rtol=0, atol=1e-6)
        moved += not torch.equal(tensor, plain[name])
    assert moved > 0


def test_trdpo_with_lora_needs_a_separate_reference_and_runs_with_one(tiny_model_dir, pref_dir, tmp_path, monkeypatch):
    from dpokit.errors import UserError

    with pytest.raises(UserError, match="ref_sync_steps': TR-DPO moves the reference, so with use_lora"):
        load_config(DPOConfig, None, ["dataset=x", "use_lora=true", "ref_sync_steps=1"])
    synced = []
    real = dpo_step.soft_update_reference
    monkeypatch.setattr(
        dpo_step, "soft_update_reference", lambda ref, pol, a: synced.append(len(pol)) or real(ref, pol, a)
    )
    run_dpo(
        tiny_model_dir,
        pref_dir,
        tmp_path / "o",
        use_lora=True,
        lora_r=4,
        ref_model=str(tiny_model_dir),
        ref_sync_steps=1,
        ref_sync_alpha=0.5,
    )
    assert len(synced) == 2  # both steps synced, and the run finished with a loadable model
    assert (tmp_path / "o" / "model.safetensors").is_file()
