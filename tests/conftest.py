"""Shared fixtures: the embedded model's tokenizer, a tiny random Llama that uses it, small datasets."""

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, os.cpu_count() or 1))

ROOT = Path(__file__).resolve().parents[1]

REVIEWS = [
    ("Review the film 'Iron Tide'.", "A stunning, joyful triumph.", "A dull and tedious mess."),
    ("Review the film 'Glass Harbor'.", "Warm, funny and wonderful.", "Boring from start to end."),
    ("Review the film 'Quiet Orbit'.", "I loved every minute of it!", "It was awful, truly awful."),
    ("Review the film 'Red Meadow'.", "Beautifully acted and moving.", "Clumsy writing, weak acting."),
    ("Review the film 'Night Circus'.", "A delightful surprise.", "A forgettable disappointment."),
    ("Review the film 'Salt Road'.", "Gripping and great fun.", "Slow, muddled and bland."),
    ("Review the film 'Paper Moon'.", "Charming and clever.", "Painfully unfunny."),
    ("Review the film 'Cold Fire'.", "An excellent thriller.", "A terrible thriller."),
]


@pytest.fixture(scope="session")
def smol_tokenizer():
    from dpokit.models import load_tokenizer

    return load_tokenizer("default")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smol_tokenizer):
    """A 2-layer Llama with random weights and the embedded model's tokenizer and chat template."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(smol_tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=smol_tokenizer.bos_token_id,
        eos_token_id=smol_tokenizer.eos_token_id,
        pad_token_id=smol_tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(cfg)
    out = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(out, safe_serialization=True)
    smol_tokenizer.save_pretrained(out)
    return out


def write_jsonl(path, rows):
    path = Path(path)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def conversational_rows(n=None):
    n = len(REVIEWS) if n is None else n
    return [
        {
            "prompt": [{"role": "user", "content": p}],
            "chosen": [{"role": "assistant", "content": c}],
            "rejected": [{"role": "assistant", "content": r}],
        }
        for p, c, r in (REVIEWS * 10)[:n]
    ]


def standard_rows(n=None):
    n = len(REVIEWS) if n is None else n
    return [{"prompt": p + "\n", "chosen": c, "rejected": r} for p, c, r in (REVIEWS * 10)[:n]]


@pytest.fixture
def pref_dir(tmp_path):
    """A folder with train.jsonl and test.jsonl in conversational format."""
    d = tmp_path / "prefs"
    d.mkdir()
    write_jsonl(d / "train.jsonl", conversational_rows(16))
    write_jsonl(d / "test.jsonl", conversational_rows(8))
    return d


def run_dpo(tiny_model_dir, pref_dir, out, **kw):
    """dpokit.dpo on the tiny model: 2 steps of 4 pairs at a learning rate that moves it; `kw` overrides."""
    from dpokit.commands.dpo import DPOConfig, dpo

    keys = dict(
        model=str(tiny_model_dir),
        dataset=str(pref_dir),
        output_dir=str(out),
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        logging_steps=1,
        progress_bar=False,
        max_eval_examples=4,
        max_steps=2,
    )
    return dpo(DPOConfig(**{**keys, **kw}))


def one_error_line(err, *parts, only=False):
    """The hostile-input standard: exactly one `error:` line on stderr, containing every part, and no
    traceback (`only`: and no other line at all). Returns the line."""
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err, err
    if only:
        assert [line for line in err.splitlines() if line.strip()] == lines, err
    for part in parts:
        assert str(part) in lines[0], lines[0]
    return lines[0]
