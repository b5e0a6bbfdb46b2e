"""Per-sequence log-probs of the padded concatenated batch against transformers' own cross-entropy,
computed one unpadded sequence at a time."""

import torch
from transformers import AutoModelForCausalLM

from conftest import conversational_rows
from dpokit.data.batch import collate_padded
from dpokit.data.tokenize import tokenize_pair
from dpokit.logprobs import gather_logps, sequence_logps


def reference_logp(model, prompt_ids, response_ids) -> float:
    """-(mean cross-entropy over response tokens) * (number of response tokens), by transformers."""
    ids = torch.tensor([prompt_ids + response_ids])
    labels = torch.tensor([[-100] * len(prompt_ids) + response_ids])
    with torch.no_grad():
        loss = model(input_ids=ids, labels=labels).loss
    return -loss.item() * len(response_ids)


def test_logps_match_transformers_cross_entropy(tiny_model_dir, smol_tokenizer):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    pairs = [tokenize_pair(smol_tokenizer, r) for _, r in enumerate(conversational_rows(5))]
    pairs[1].chosen_ids = pairs[1].chosen_ids * 3  # uneven lengths: real padding in the batch
    batch = collate_padded(pairs, smol_tokenizer.pad_token_id)
    assert (batch["attention_mask"] == 0).any()
    with torch.no_grad():
        logps, n_tokens = sequence_logps(model, batch)
    expected = [reference_logp(model, p.prompt_ids, p.chosen_ids) for p in pairs] + \
               [reference_logp(model, p.prompt_ids, p.rejected_ids) for p in pairs]
    assert torch.allclose(logps.double(), torch.tensor(expected, dtype=torch.float64), atol=1e-5, rtol=0)
    assert n_tokens.tolist() == [len(p.chosen_ids) for p in pairs] + [len(p.rejected_ids) for p in pairs]


def test_gather_logps_hand_computed():
    # vocabulary of 3, one sequence [0, 1, 2] whose last two tokens are the response
    logits = torch.tensor([[[0.0, 1.0, 0.0], [2.0, 0.0, 1.0], [0.0, 0.0, 0.0]]])
    ids = torch.tensor([[0, 1, 2]])
    mask = torch.tensor([[0, 1, 1]])
    logps, n = gather_logps(logits, ids, mask)
    expected = (1.0 - torch.logsumexp(torch.tensor([0.0, 1.0, 0.0]), 0)) + \
               (1.0 - torch.logsumexp(torch.tensor([2.0, 0.0, 1.0]), 0))
    assert torch.allclose(logps, expected.reshape(1)) and n.tolist() == [2]
