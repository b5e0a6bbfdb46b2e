"""report_to (tensorboard, wandb), the model card (output_dir/README.md) and push_to_hub, on the tiny model."""

import json

import pytest
import yaml
from conftest import run_dpo

from dpokit.errors import UserError


def metrics_rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def front_matter(text):
    assert text.startswith("---\n")
    head, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(head), body


def test_tensorboard_event_files_hold_the_logged_scalars(tiny_model_dir, pref_dir, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    run_dpo(tiny_model_dir, pref_dir, out, report_to=["tensorboard"], run_name="tb-run")
    log_dir = out / "runs" / "tb-run"
    assert list(log_dir.glob("events.out.tfevents.*"))
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    rows = metrics_rows(out)
    assert any("eval/loss" in r for r in rows) and any("rewards/accuracies" in r for r in rows)
    checked = 0
    for row in rows:
        for key, value in row.items():
            if key == "step" or isinstance(value, (bool, str)):
                continue
            assert key in tags, key
            at_step = {e.step: e.value for e in acc.Scalars(key)}
            assert at_step[row["step"]] == pytest.approx(value, rel=1e-6, abs=1e-6), (key, row["step"])
            checked += 1
    assert checked > 20


def test_wandb_offline_writes_a_run_directory(tiny_model_dir, pref_dir, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    wandb_dir = tmp_path / "wandb-home"
    wandb_dir.mkdir()
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(wandb_dir))
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dpo(tiny_model_dir, pref_dir, tmp_path / "run", report_to=["wandb"], run_name="wb-run")
    runs = list((wandb_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert list(runs[0].glob("*.wandb"))  # the run's records, for `wandb sync`


def test_report_to_none_and_all(monkeypatch):
    from dpokit.commands.dpo import DPOConfig
    from dpokit.config import load_config
    from dpokit.train.reporters import reporters_for

    assert load_config(DPOConfig, None, ["dataset=x.jsonl", "report_to=none"]).report_to == ["none"]
    assert reporters_for(["none"]) == [] and reporters_for(None) == []
    assert reporters_for(["all"]) == ["tensorboard", "wandb"]
    with pytest.raises(UserError, match="report_to"):
        load_config(DPOConfig, None, ["dataset=x.jsonl", "report_to=none,wandb"])
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None if name == "wandb" else object())
    with pytest.raises(UserError, match=r"report_to.*dpokit\[wandb\]"):
        load_config(DPOConfig, None, ["dataset=x.jsonl", "report_to=wandb"])


def test_bad_report_to_is_one_line_naming_the_key(tmp_path, capsys):
    from dpokit.cli import main

    out = tmp_path / "never"
    assert main(["dpo", "report_to=mlflow", f"output_dir={out}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "report_to" in err and "mlflow" in err
    assert not out.exists()


def test_push_to_hub_needs_hub_model_id():
    from dpokit.commands.dpo import DPOConfig
    from dpokit.config import load_config

    with pytest.raises(UserError, match="hub_model_id"):
        load_config(DPOConfig, None, ["dataset=x.jsonl", "push_to_hub=true"])


def test_model_card(tiny_model_dir, pref_dir, tmp_path):
    out = tmp_path / "run"
    run_dpo(tiny_model_dir, pref_dir, out, beta=0.25, loss_type=["sigmoid"])
    meta, body = front_matter((out / "README.md").read_text())
    assert meta["library_name"] == "transformers"
    assert meta["tags"] == ["dpo", "dpokit"]
    assert "base_model" not in meta and "datasets" not in meta  # local paths are not hub names
    assert str(tiny_model_dir) in body
    assert "sigmoid" in body and "| beta | 0.25 |" in body and "| learning_rate |" in body
    rows = metrics_rows(out)
    last_train = [r for r in rows if "loss" in r][-1]
    last_eval = [r for r in rows if "eval/loss" in r][-1]
    from dpokit.report import fmt

    assert f"| loss | {fmt(last_train['loss'])} |" in body
    assert f"| eval/loss | {fmt(last_eval['eval/loss'])} |" in body
    assert ("![training curves](training_curves.png)" in body) == (out / "training_curves.png").is_file()
    assert "dpokit dpo --config config.yaml" in body and (out / "config.yaml").is_file()


def test_model_card_front_matter_names_hub_model_and_datasets(tmp_path):
    from dpokit.commands.dpo import DPOConfig
    from dpokit.commands.sft import SFTConfig
    from dpokit.report import fmt
    from dpokit.train.model_card import command_of, render_card

    cfg = DPOConfig(model="org/base-model", dataset="trl-lib/ultrafeedback_binarized", output_dir=str(tmp_path))
    rows = [{"step": 0, "eval/loss": 0.69}, {"step": 5, "loss": 0.5}, {"step": 5, "eval/loss": 0.6}]
    meta, body = front_matter(render_card(cfg, command_of(cfg), rows, 5, curves=False))
    assert meta == {
        "base_model": "org/base-model",
        "library_name": "transformers",
        "tags": ["dpo", "dpokit"],
        "datasets": ["trl-lib/ultrafeedback_binarized"],
    }
    assert (
        "training_curves.png" not in body and f"| eval/loss | {fmt(0.6)} |" in body and f"| loss | {fmt(0.5)} |" in body
    )
    assert command_of(SFTConfig()) == "sft"
    meta, _ = front_matter(render_card(DPOConfig(model="default", dataset="x.jsonl"), "dpo", [], 0, False))
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and "datasets" not in meta


class FakeHfApi:
    calls = []
    fail = None

    def create_repo(self, repo_id, exist_ok=False, **kw):
        FakeHfApi.calls.append(("create_repo", repo_id, exist_ok))

    def upload_folder(self, repo_id, folder_path, **kw):
        from pathlib import Path

        folder = Path(folder_path)
        # what is on disk when the upload starts: the final model and the card
        FakeHfApi.calls.append(
            (
                "upload_folder",
                repo_id,
                folder,
                (folder / "model.safetensors").is_file(),
                (folder / "README.md").is_file(),
            )
        )
        if FakeHfApi.fail:
            raise FakeHfApi.fail


def test_push_to_hub_uploads_output_dir_after_the_model_is_saved(tiny_model_dir, pref_dir, tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    monkeypatch.setattr(FakeHfApi, "calls", [])
    out = tmp_path / "run"
    run_dpo(tiny_model_dir, pref_dir, out, push_to_hub=True, hub_model_id="me/tiny-dpo")
    assert FakeHfApi.calls == [("create_repo", "me/tiny-dpo", True), ("upload_folder", "me/tiny-dpo", out, True, True)]


def test_push_to_hub_failure_is_one_line_and_keeps_the_model(tiny_model_dir, pref_dir, tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    monkeypatch.setattr(FakeHfApi, "calls", [])
    monkeypatch.setattr(FakeHfApi, "fail", ConnectionError("huggingface.co unreachable\nretries exhausted"))
    out = tmp_path / "run"
    with pytest.raises(UserError) as e:
        run_dpo(tiny_model_dir, pref_dir, out, push_to_hub=True, hub_model_id="me/tiny-dpo")
    message = str(e.value)
    assert len(message.splitlines()) == 1
    assert str(out) in message and "upload" in message and "huggingface.co unreachable" in message
    assert (out / "model.safetensors").is_file() and (out / "README.md").is_file()
