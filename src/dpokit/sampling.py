"""Sampling responses from a causal LM: batched, left-padded `generate`, each response cut after its
first EOS; the output layer runs in fp32 even under bf16 autocast (logprobs.fp32_output_layer), so the
samples come from the distribution dpokit scores. Used by `dpokit generate`, `rl` and `eval`.

With return_logps, each response's log pi(y|x) comes from the logits that sampled it (the raw logits,
before any temperature / top-k / top-p): `dpokit eval` then needs no second forward of the policy for
its KL (tests/test_numerics.py checks these against a scoring forward)."""

import torch

from dpokit.data.batch import pad_left
from dpokit.logprobs import fp32_output_layer


def device_of(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def sample_responses(
    model,
    tokenizer,
    prompts: list,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    batch_size: int = 32,
    return_logps: bool = False,
):
    """Token-id prompts -> one sampled response each (token ids, cut after the first EOS, which is kept);
    with return_logps, (responses, their log pi(y|x) under the untempered model: a float per response,
    0.0 for an empty one).

    Uses the global torch RNG (seed it for repeatable samples). The model is put in eval mode while
    sampling and put back as it was."""
    was_training = model.training
    model.eval()
    device, pad, eos = device_of(model), tokenizer.pad_token_id, tokenizer.eos_token_id
    sampling = (
        {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": top_k}
        if temperature > 0
        else {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    )
    # a sharded (fsdp) model gathers its parameters with the other ranks at every forward: every rank
    # must run as many forwards as the longest generation among them
    synced = {"synced_gpus": True} if any(type(p).__name__ == "DTensor" for p in model.parameters()) else {}
    out, logps = [], []
    scored = {"output_logits": True, "return_dict_in_generate": True} if return_logps else {}
    try:
        for i in range(0, len(prompts), batch_size):
            chunk = prompts[i : i + batch_size]
            T = max(len(p) for p in chunk)
            input_ids, attention = (t.to(device) for t in pad_left(chunk, pad))  # (b, T) each
            with fp32_output_layer(model):
                generated = model.generate(
                    input_ids=input_ids,
                    attention_mask=attention,
                    max_new_tokens=max_new_tokens,
                    pad_token_id=pad,
                    eos_token_id=eos,
                    **sampling,
                    **synced,
                    **scored,
                )
            sequences = generated.sequences if return_logps else generated
            rows = [row[: row.index(eos) + 1] if eos in row else row for row in sequences[:, T:].tolist()]
            out += rows
            if return_logps:
                logps += generated_logps(generated.logits, sequences[:, T:], [len(r) for r in rows])
    finally:
        model.train(was_training)
    return (out, logps) if return_logps else out


def generated_logps(logits: tuple, tokens: torch.Tensor, lengths: list) -> list:
    """Per row, the sum over its first lengths[i] generated tokens of log softmax(logits_t)[token_t]:
    logits is generate's per-step tuple of raw (b, V) logits, tokens (b, steps)."""
    total = torch.zeros(tokens.shape[0], dtype=torch.float64, device=tokens.device)
    keep = torch.tensor(lengths, device=tokens.device)
    for t, z in enumerate(logits):  # one step at a time: never all (b, steps, V) at once
        z = z.float()
        lp = z.gather(-1, tokens[:, t, None]).squeeze(-1) - z.logsumexp(-1)  # (b,) as logprobs.token_logps
        total += torch.where(t < keep, lp, torch.zeros_like(lp)).double()
    return total.tolist()
