"""Every loss type through the real DPO job on a tiny model; reference-free losses load no reference;
TR-DPO and BCO keep their state across an exact resume."""

import shutil

import pytest
import torch

from dpokit import models
from dpokit.config import LOSS_TYPES, DPOConfig, load_config
from dpokit.losses import LOSSES
from dpokit.train import dpo


def test_config_knows_every_loss():
    assert set(LOSS_TYPES) == set(LOSSES) | {"kto"}


def run_dpo(tiny_model_dir, pref_dir, out, **kw):
    cfg = DPOConfig(model=str(tiny_model_dir), dataset=str(pref_dir), output_dir=str(out),
                    per_device_train_batch_size=4, learning_rate=1e-3, logging_steps=1, progress_bar=False,
                    max_eval_examples=4, **{"max_steps": 2, **kw})
    return dpo.run(cfg)


@pytest.mark.parametrize("loss_type", [["ipo"], ["hinge"], ["robust"], ["exo_pair"], ["bco_pair"], ["aot"],
                                       ["discopop"], ["simpo"], ["orpo"], ["sigmoid", "sft"]])
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
    step = dpo.DPOStep(reference, cfg)
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
        rows.append({"prompt": [{"role": "user", "content": p}], "completion": [{"role": "assistant", "content": c}],
                     "label": True})
        rows.append({"prompt": [{"role": "user", "content": p}], "completion": [{"role": "assistant", "content": r}],
                     "label": "false"})
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
    assert main(["dpo", f"model={tiny_model_dir}", f"dataset={path}", "loss_type=kto",
                 f"output_dir={tmp_path / 'o'}"]) == 2
    assert "k.jsonl: row 2: field 'label': expected true or false, got 'maybe'" in capsys.readouterr().err
