"""The bundled preference data: its size, and every pair tokenizing cleanly with the embedded model."""

from pathlib import Path

import pytest

from dpokit.data.load import load_pairs
from dpokit.data.tokenize import tokenize_dataset

DATA = Path(__file__).resolve().parents[1] / "data" / "sentiment"


@pytest.mark.parametrize("split,minimum", [("train", 1000), ("test", 200)])
def test_bundled_data(split, minimum, smol_tokenizer):
    rows, label, fmt = load_pairs(str(DATA), split)
    assert fmt == "conversational" and len(rows) >= minimum
    pairs, stats = tokenize_dataset(smol_tokenizer, rows, label)
    assert stats.dropped == {}
    eos = smol_tokenizer.eos_token_id
    for p in pairs:
        for resp in (p.chosen_ids, p.rejected_ids):
            assert resp[-1] == eos and resp.count(eos) == 1


def test_splits_share_no_prompt():
    train = {str(r["prompt"]) for _, r in load_pairs(str(DATA), "train")[0]}
    test = {str(r["prompt"]) for _, r in load_pairs(str(DATA), "test")[0]}
    assert not train & test
