"""Per-sequence log-probabilities log pi(y|x) = sum_t log pi(y_t | x, y_<t), over response tokens only.

The logits are cast to fp32 before the log-softmax, for the policy and the reference alike: in bf16
a 50k-way log-softmax loses the small differences that the DPO loss is made of. Only the positions
that predict a response token are sent through the log-softmax (prompt and padding positions are
dropped first), which also keeps the fp32 copy of the logits small.
"""

import torch


def gather_logps(logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor):
    """logits (N, T, V) of a causal LM on input_ids (N, T) -> (logps (N,), n_tokens (N,)).

    Position t predicts token t+1, so token t+1 counts when loss_mask[t+1] is set.
    """
    targets = input_ids[:, 1:]                            # (N, T-1)
    mask = loss_mask[:, 1:].bool()                        # (N, T-1)
    picked = logits[:, :-1][mask].float()                 # (M, V) response positions only
    token_logps = picked.log_softmax(-1).gather(-1, targets[mask].unsqueeze(-1)).squeeze(-1)  # (M,)
    row = mask.nonzero()[:, 0]                            # (M,) which sequence each token is in
    logps = torch.zeros(input_ids.shape[0], dtype=torch.float32, device=logits.device)
    logps = logps.index_add(0, row, token_logps)
    return logps, mask.sum(-1)


def sequence_logps(model, batch: dict):
    """One forward pass over the whole (2B, T) batch -> (logps (2B,), n_response_tokens (2B,))."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    return gather_logps(out.logits, batch["input_ids"], batch["loss_mask"])
