"""Batches of tokenized pairs, in the padded layout: the chosen and rejected sequences of B pairs
stacked into one (2B, T) batch, so the policy sees both in a single forward pass.

Rows 0..B-1 are prompt + chosen, rows B..2B-1 are prompt + rejected, padded on the right.
`loss_mask` marks the response tokens (the tokens whose log-probs are summed).
"""

import torch


def pad_right(seqs: list, value: int) -> torch.Tensor:
    T = max(len(s) for s in seqs)
    out = torch.full((len(seqs), T), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return out


def pad_left(seqs: list, value: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, T) left-padded ids and their attention mask: what generation is fed (new tokens follow the
    last column)."""
    T = max(len(s) for s in seqs)
    ids = torch.tensor([[value] * (T - len(s)) + list(s) for s in seqs], dtype=torch.long)
    mask = torch.tensor([[0] * (T - len(s)) + [1] * len(s) for s in seqs], dtype=torch.long)
    return ids, mask


def collate_padded(pairs: list, pad_id: int) -> dict:
    """B TokenizedPairs -> {input_ids, attention_mask, loss_mask}: (2B, T) tensors."""
    seqs, masks = [], []
    for responses in ("chosen_ids", "rejected_ids"):
        for p in pairs:
            resp = getattr(p, responses)
            seqs.append(p.prompt_ids + resp)
            masks.append([0] * len(p.prompt_ids) + [1] * len(resp))
    input_ids = pad_right(seqs, pad_id)
    attention_mask = pad_right([[1] * len(s) for s in seqs], 0)
    loss_mask = pad_right(masks, 0)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "loss_mask": loss_mask,
        "num_examples": len(pairs),
        "num_tokens": int(attention_mask.sum()),
    }
