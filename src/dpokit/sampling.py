"""Sampling responses from a causal LM: batched, left-padded `generate`, each response cut after its
first EOS; the output layer runs in fp32 even under bf16 autocast (logprobs.fp32_output_layer), so the
samples come from the distribution dpokit scores. Used by `dpokit generate`, `rl` and `eval`."""

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
) -> list:
    """Token-id prompts -> one sampled response each (token ids, cut after the first EOS, which is kept).

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
    out = []
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
                )
            for row in generated[:, T:].tolist():
                out.append(row[: row.index(eos) + 1] if eos in row else row)
    finally:
        model.train(was_training)
    return out
