"""The SFT step: the negative log-likelihood of each example's completion tokens (the pi_SFT that DPO and
RLHF start from), on the padded or packed layout. `dpokit sft` (commands/sft.py) hands it to the loop."""

import torch

from dpokit.data.batch import pad_right
from dpokit.data.layouts import CHOSEN, PROMPT, Block, assemble
from dpokit.logprobs import (
    chunked_token_logps,
    model_inputs,
    resolve_chunk_size,
    response_targets,
    token_logps_from_logits,
)


def collate_sft(examples: list, pad_id: int, packed: bool = False) -> dict:
    """B examples (prompt_ids, chosen_ids = completion) -> a padded (B, T) batch with a loss_mask over the
    completion tokens, or (packed) one (1, L) row in the layout of data/layouts.py."""
    B = len(examples)
    if packed:
        blocks = []
        for i, e in enumerate(examples):
            b = Block()
            b.add(e.prompt_ids, PROMPT, 0, None, None)
            b.add(e.chosen_ids, CHOSEN, len(e.prompt_ids), len(e.prompt_ids) - 1, i)
            blocks.append(b)
        return assemble(blocks, pad_id, packed=True, layout="packed", num_examples=B)
    seqs = [e.prompt_ids + e.chosen_ids for e in examples]
    input_ids = pad_right(seqs, pad_id)  # (B, T)
    attention_mask = pad_right([[1] * len(s) for s in seqs], 0)
    loss_mask = pad_right([[0] * len(e.prompt_ids) + [1] * len(e.chosen_ids) for e in examples], 0)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "loss_mask": loss_mask,
        "num_examples": B,
        "num_tokens": int(attention_mask.sum()),
    }


class SFTStep:
    """step(model, batch) -> (losses (B,), metrics): the completion tokens' NLL per example."""

    def __init__(self, cfg):
        self.chunk_size, self.normalization = cfg.logprob_chunk_size, cfg.loss_normalization

    def __call__(self, model, batch):
        B = batch["num_examples"]
        if self.chunk_size == 0:  # automatic: sized from this model's vocabulary, once
            self.chunk_size = resolve_chunk_size(model, 0)
        positions, targets, sequences = response_targets(batch)  # each (M,)
        inputs = model_inputs(model, batch)
        if self.chunk_size is None:
            token_logps = token_logps_from_logits(model, inputs, positions, targets)  # (M,)
        else:
            token_logps = chunked_token_logps(model, inputs, positions, targets, self.chunk_size)
        nll = torch.zeros(B, dtype=torch.float32, device=token_logps.device).index_add(0, sequences, -token_logps)
        n_tokens = torch.bincount(sequences, minlength=B).float()  # (B,)
        mean_nll = nll / n_tokens
        losses = mean_nll if self.normalization == "sequence" else nll
        # (values, weights): the window's mean is sum(NLL) / sum(tokens), the per-token NLL
        return losses, {"nll": (mean_nll.detach(), n_tokens), "completion_tokens": n_tokens}
