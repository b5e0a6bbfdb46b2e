"""Per-sequence log-probabilities log pi(y|x) = sum_t log pi(y_t | x, y_<t), over response tokens only.

How the numbers are kept accurate (each measured against a float64 forward of the same model in
tests/test_layouts.py and tests/test_logprobs.py):
- The output layer runs in fp32 whatever the autocast (`fp32_head`, on by default): the hidden states
  are upcast and multiplied by the fp32 head weight. Under bf16 autocast the model's own lm_head would
  round every logit to bf16 (8 bits of mantissa: ~0.04 on a logit of 10). The rest of the model still
  runs in bf16, and its rounding stays: on the embedded SmolLM2-135M (32-token responses) a sequence's
  log-prob is 0.137 nats off fp32 on average with the bf16 head (max 0.33), 0.085 with the fp32 head
  (max 0.27). For exact log-probs, use precision fp32.
- A token's log-prob is logit[target] - logsumexp(logits), in fp32. torch's fp32 `log_softmax` on CPU
  sums the exponentials in a way that loses the small terms of a peaked distribution (the tail under
  a max ~20 nats above it): it reads high by ~3-9e-6 per token, ~5e-4 on a 200-token response;
  `logsumexp` reduces with a pairwise sum and is within ~1e-6 of float64 per token.
- A sequence's token log-probs are summed in float64 and rounded to fp32 once.
`response_logps` is the same forward kept per token (a ResponseLogps): LD-DPO's sums split at a token
count (`split_sums`) and WPO's weights (`wpo_log_weights`, from the same logits under no_grad; not chunked).
Only the positions that predict a response token get logits at all (prompt and padding positions are
dropped first, by `logits_to_keep` where the model has it), which also keeps the fp32 logits small.

`sequence_logps` reads every batch layout of data/batch.py and data/layouts.py (see docs/layouts.md):
- padded: one forward over (2B, T) with the 2D attention mask; position t predicts token t+1.
- packed: position ids that restart at each sequence and no attention mask, so transformers builds the
  block-diagonal causal mask itself (masking_utils.find_packed_sequence_indices).
- prefix-shared: an explicit 4D mask (layouts.prefix_shared_mask), as bool for sdpa, additive for eager.
- chunk_size: the lm_head is applied to response positions only, chunk_size of them at a time, by
  `ChunkedTokenLogps`, whose backward recomputes each chunk's logits: the [tokens x vocab] logits never
  exist at once, in the forward or the backward. The model's own forward still runs (so DDP and PEFT
  wrappers see their usual call); a pre-hook on the output embedding takes the hidden states it is
  given and lets it compute logits for a single position, which checks our head against the model's.
"""

import contextlib
import inspect
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dpokit.data.layouts import prefix_shared_mask
from dpokit.errors import UserError


def token_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """logits (..., V), targets (...) -> log softmax(logits)[target] (...) in fp32, as
    logit[target] - logsumexp(logits): accurate to ~1e-6 where fp32 `log_softmax` reads high (above)."""
    logits = logits.float()
    return logits.gather(-1, targets[..., None]).squeeze(-1) - logits.logsumexp(-1)


def sum_per_sequence(token_logps: torch.Tensor, sequences: torch.Tensor, n: int) -> torch.Tensor:
    """(M,) token log-probs, (M,) sequence index -> (n,) fp32 sums, accumulated in float64 (a 1000-token
    fp32 running sum drifts by ~1e-4)."""
    total = torch.zeros(n, dtype=torch.float64, device=token_logps.device)
    return total.index_add(0, sequences, token_logps.double()).float()


def gather_logps(logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor):
    """logits (N, T, V) of a causal LM on input_ids (N, T) -> (logps (N,), n_tokens (N,)).

    Position t predicts token t+1, so token t+1 counts when loss_mask[t+1] is set.
    """
    targets = input_ids[:, 1:]  # (N, T-1)
    mask = loss_mask[:, 1:].bool()  # (N, T-1)
    row = mask.nonzero()[:, 0]  # (M,) which sequence each token is in
    logps = sum_per_sequence(token_logps(logits[:, :-1][mask], targets[mask]), row, input_ids.shape[0])
    return logps, mask.sum(-1)


def sequence_logps(model, batch: dict, chunk_size: int | None = None, fp32_head: bool = True):
    """One forward pass over the batch -> (logps (2B,), n_response_tokens (2B,)): chosen of pairs 0..B-1,
    then rejected, whatever the layout. chunk_size: compute the lm_head that many positions at a time.
    fp32_head: under autocast, compute the output layer in fp32 all the same (see the module docstring;
    False: the model's own head in the autocast dtype, ~0.1 nats of noise per sequence in bf16)."""
    tokens = response_logps(model, batch, chunk_size, fp32_head)
    return tokens.sums(), tokens.lengths()


def response_logps(
    model, batch: dict, chunk_size: int | None = None, fp32_head: bool = True, wpo: bool = False
) -> "ResponseLogps":
    """sequence_logps's forward, kept per token: a ResponseLogps, whose reductions give the per-sequence
    sums (`sums`), LD-DPO's split sums (`split_sums`) and, with wpo=True, WPO's log-weights
    (`wpo_log_weights`, computed under no_grad from the same logits; not with chunk_size)."""
    positions, targets, sequences = response_targets(batch)  # each (M,)
    inputs = model_inputs(model, batch)
    wpo_terms = None
    if chunk_size is None:
        logits = kept_logits(model, inputs, positions, fp32_head)  # (M, V)
        token_lp = token_logps(logits, targets)
        if wpo:
            wpo_terms = wpo_token_terms(logits, token_lp)
        del logits
    elif wpo:
        raise UserError(
            "key 'use_weighting': WPO's weights need every token's probability at each response position, "
            "which logprob_chunk_size never holds at once; set logprob_chunk_size to null"
        )
    else:
        token_lp = chunked_token_logps(model, inputs, positions, targets, chunk_size, fp32_head)
    n = batch.get("num_sequences")  # ranked lists (data/rankings.py): K responses per list
    if n is None:
        n = batch["input_ids"].shape[0] if batch.get("layout", "padded") == "padded" else 2 * batch["num_examples"]
    return ResponseLogps(token_lp, sequences, token_steps(positions, sequences, n), n, wpo_terms)


@torch.no_grad()
def wpo_token_terms(logits: torch.Tensor, token_lp: torch.Tensor) -> torch.Tensor:
    """logits (M, V), log pi(y_t) (M,) -> log pi(y_t|x,y_<t) - log sum_v pi(v|x,y_<t)^2, (M,), fp32, no grad:
    WPO's per-token term (Zhou et al. 2024, arXiv 2406.11827, Eq. 2), the sum of squares as
    logsumexp(2 log p) so that a peaked distribution loses nothing."""
    logits = logits.float()
    logp = logits - logits.logsumexp(-1, keepdim=True)  # (M, V)
    return token_lp.detach() - (2 * logp).logsumexp(-1)


def token_steps(positions: torch.Tensor, sequences: torch.Tensor, n: int) -> torch.Tensor:
    """(M,) t: each response token's index within its own response (0 for its first token). Within one
    sequence, later tokens sit at later flat positions in every layout, so sorting by (sequence, position)
    puts each response in order."""
    if positions.numel() == 0:
        return positions.clone()
    order = torch.argsort(sequences * (int(positions.max()) + 1) + positions)  # (M,)
    counts = torch.bincount(sequences, minlength=n)
    starts = torch.cumsum(counts, 0) - counts  # (n,) first sorted index of each sequence
    steps = torch.empty_like(positions)
    steps[order] = torch.arange(len(order), device=positions.device) - starts[sequences[order]]
    return steps


@dataclass
class ResponseLogps:
    """The response tokens of a batch: log pi(y_t|x,y_<t) (M,), with their sequence (0..2B-1, chosen then
    rejected) and step t within it, and (WPO) the no-grad terms log p_t - log sum_v p_v^2."""

    token_logps: torch.Tensor  # (M,) fp32, carries the gradient
    sequences: torch.Tensor  # (M,)
    steps: torch.Tensor  # (M,)
    n: int  # number of sequences, 2B
    wpo_terms: torch.Tensor | None = None  # (M,) or None

    def sums(self) -> torch.Tensor:
        """(n,) log pi(y|x) = sum_t log pi(y_t|x,y_<t)."""
        return sum_per_sequence(self.token_logps, self.sequences, self.n)

    def lengths(self) -> torch.Tensor:
        """(n,) response token counts |y|."""
        return torch.bincount(self.sequences, minlength=self.n)

    def split_sums(self, k: torch.Tensor):
        """k (n,) token counts -> (front (n,), rear (n,)): the sum over each response's first k tokens and
        over the rest (LD-DPO's public and excess parts); front + rear = sums()."""
        front = self.steps < k.to(self.steps.device)[self.sequences]  # (M,)
        zero = torch.zeros_like(self.token_logps)
        return (
            sum_per_sequence(torch.where(front, self.token_logps, zero), self.sequences, self.n),
            sum_per_sequence(torch.where(front, zero, self.token_logps), self.sequences, self.n),
        )

    def wpo_log_weights(self) -> torch.Tensor:
        """(n,) log w(x, y) = (1/|y|) sum_t [log p(y_t) - log sum_v p(v)^2] (WPO, arXiv 2406.11827), no grad."""
        if self.wpo_terms is None:
            raise ValueError("computed without wpo=True")
        return sum_per_sequence(self.wpo_terms, self.sequences, self.n) / self.lengths().clamp(min=1)


# --- what the model is given, and which of its outputs count -------------------------------------------


def response_targets(batch: dict):
    """(logit_positions, target_ids, target_sequence), each (M,): the flat position into input_ids.view(-1)
    whose logits predict each response token, the token, and its sequence (0..2B-1)."""
    if "logit_positions" in batch:
        return batch["logit_positions"], batch["target_ids"], batch["target_sequence"]
    ids, mask = batch["input_ids"], batch["loss_mask"].bool()  # padded: (2B, T)
    row, col = mask[:, 1:].nonzero(as_tuple=True)  # token col+1 of row is a response token
    return row * ids.shape[1] + col, ids[row, col + 1], row


def model_inputs(model, batch: dict) -> dict:
    """The forward's keyword arguments for the batch's layout (no attention_mask at all when packed)."""
    layout = batch.get("layout", "padded")
    if layout == "padded":
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    inner = unwrap(model)
    check_attention_layers(inner.config, layout, int(batch["position_ids"].max()) + 1)
    inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}
    if layout == "packed":
        return inputs  # attention_mask=None: transformers derives the packed mask from position_ids
    allowed = prefix_shared_mask(batch["sequence_ids"], batch["segment_ids"])  # (N, 1, T, T)
    if inner.config._attn_implementation == "eager":
        dtype = inner.get_input_embeddings().weight.dtype  # eager adds the mask to the attention scores
        allowed = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
            ~allowed, torch.finfo(dtype).min
        )
    return {**inputs, "attention_mask": allowed}


def check_attention_layers(config, layout: str, longest: int):
    """Refuse what these layouts would get silently wrong: recurrent or linear-attention layers know
    nothing of sequence boundaries in a row; an explicit 4D mask is one mask for every layer, so a
    sliding window is honoured only if no sequence is longer than the window."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    impl = config._attn_implementation
    if layout.startswith("prefix_shared") and impl not in ("sdpa", "eager"):
        raise UserError(f"prefix sharing needs attn_implementation sdpa or eager (an explicit 4D mask), not {impl}")
    kinds = set(getattr(config, "layer_types", None) or ["full_attention"])
    other = kinds - {"full_attention", "sliding_attention"}
    if other:
        raise UserError(
            f"the {layout} layout needs a model made of attention layers only; this one has "
            f"{', '.join(sorted(other))} layers: use the padded layout"
        )
    window = getattr(config, "sliding_window", None)
    sliding = "sliding_attention" in kinds or (window and getattr(config, "use_sliding_window", True))
    if layout.startswith("prefix_shared") and sliding and window and longest > window:
        raise UserError(
            f"prefix sharing: a sequence of {longest} tokens is longer than the model's sliding "
            f"window ({window}); use padding_free or the padded layout"
        )


def unwrap(model):
    """The transformers model inside DDP, torch.compile and PEFT wrappers (its config, head, signature)."""
    while True:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif hasattr(model, "get_base_model"):
            model = model.get_base_model()
        else:
            return model


def kept_positions(model, positions: torch.Tensor, shape):
    """(logits_to_keep, rows): the columns the model should compute logits for, (K,), and for each target
    the row of the flattened (N * K) output that predicts it. All columns when the model can't restrict."""
    N, T = shape
    if "logits_to_keep" not in inspect.signature(unwrap(model).forward).parameters:
        return None, positions
    columns = torch.unique(positions % T)  # (K,) sorted
    rows = (positions // T) * len(columns) + torch.searchsorted(columns, positions % T)
    return columns, rows


def token_logps_from_logits(model, inputs: dict, positions, targets, fp32_head: bool = True) -> torch.Tensor:
    """log pi(target) for each response token, (M,), from the model's own logits at the kept positions."""
    return token_logps(kept_logits(model, inputs, positions, fp32_head), targets)  # (M,)


def kept_logits(model, inputs: dict, positions, fp32_head: bool = True) -> torch.Tensor:
    """(M, V) the model's logits at the positions that predict the response tokens."""
    keep, rows = kept_positions(model, positions, inputs["input_ids"].shape)
    extra = {} if keep is None else {"logits_to_keep": keep}
    with fp32_output_layer(model, fp32_head):
        logits = model(**inputs, use_cache=False, **extra).logits  # (N, K, V)
    return logits.flatten(0, 1)[rows]


@contextlib.contextmanager
def fp32_output_layer(model, enabled: bool = True):
    """Within it, the model's output layer computes its logits in fp32 even under autocast: hidden states
    upcast, the fp32 head weight, autocast off for that one matmul. Whatever the model does to the logits
    afterwards (a soft-cap, a scale) still happens, to the fp32 logits. A no-op without autocast, or when
    the head's weights are not fp32 (a model loaded in bf16 has no fp32 head to use). For a plain
    nn.Linear head the model's own call is given a single position, so the bf16 logits it would have
    computed and thrown away cost nothing.
    """
    head = unwrap(model).get_output_embeddings() if enabled else None
    weight = getattr(head, "weight", None)
    if weight is None or weight.dtype != torch.float32 or not torch.is_autocast_enabled(weight.device.type):
        yield
        return
    device, plain, given = weight.device.type, type(head) is torch.nn.Linear, []

    def take_input(module, args):
        given.append(args[0])  # (..., H)
        if plain:
            return (args[0].reshape(-1, args[0].shape[-1])[:1],) + args[1:]

    def fp32_logits(module, args, output):
        h = given.pop()
        with torch.autocast(device, enabled=False):
            if plain:
                return F.linear(h.float(), module.weight, module.bias)  # (..., V) fp32
            return module.forward(h.float())  # e.g. a LoRA-wrapped head, fp32 weights

    hooks = [head.register_forward_pre_hook(take_input), head.register_forward_hook(fp32_logits)]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


# --- the chunked lm_head ---------------------------------------------------------------------------------

# logprob_chunk_size = 0 means "pick it": the largest power of two whose (chunk, V) fp32 logits stay within
# this many elements (2^26: 256 MiB per buffer; the backward holds a few). SmolLM2's 49,152-token
# vocabulary gets 1024, the chunk vs_trl.py measured; Llama 3's 128k gets 512, Gemma's 256k gets 256.
AUTO_CHUNK_ELEMENTS = 2**26
AUTO_CHUNK_RANGE = (128, 4096)


def auto_chunk_size(vocab_size: int) -> int:
    """The automatic logprob_chunk_size for a vocabulary: a power of two, chunk * V <= AUTO_CHUNK_ELEMENTS,
    clamped to AUTO_CHUNK_RANGE (a smaller chunk only adds loop overhead, a bigger one saves nothing)."""
    lo, hi = AUTO_CHUNK_RANGE
    chunk = 1 << max(0, (AUTO_CHUNK_ELEMENTS // max(1, vocab_size)).bit_length() - 1)
    return max(lo, min(hi, chunk))


def resolve_chunk_size(model, chunk_size):
    """A config's logprob_chunk_size for this model: None stays None (full logits), a positive size stays,
    0 (automatic) becomes auto_chunk_size(V), or None when the model's output layer is not a plain
    nn.Linear (a LoRA on lm_head, a custom head): automatic never turns into an error."""
    if chunk_size != 0:
        return chunk_size
    head = unwrap(model).get_output_embeddings() if hasattr(unwrap(model), "get_output_embeddings") else None
    if type(head) is not torch.nn.Linear:
        return None
    return auto_chunk_size(head.weight.shape[0])


def output_head(model):
    """(weight (V, H), bias (V,) or None, scale, softcap) of a standard *ForCausalLM's output layer:
    logits = softcap * tanh(scale * (h W^T + b) / softcap), the last step only if softcap is set."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if type(head) is not torch.nn.Linear:
        raise UserError(
            f"chunked log-probs need a *ForCausalLM whose get_output_embeddings() is a plain "
            f"nn.Linear; {type(model).__name__} has {type(head).__name__} (a LoRA on lm_head?): "
            f"set logprob_chunk_size to null"
        )
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    scale = 1.0
    if getattr(config, "logit_scale", None) is not None:  # Cohere: logits * logit_scale
        scale *= config.logit_scale
    if getattr(config, "logits_scaling", None) is not None:  # Granite: logits / logits_scaling
        scale /= config.logits_scaling
    softcap = getattr(config, "final_logit_softcapping", None)  # Gemma 2 / 3
    return head, scale, softcap


_CHECKED_HEADS = weakref.WeakSet()  # models whose logits we have once reproduced from their hidden states


def chunked_token_logps(
    model, inputs: dict, positions, targets, chunk_size: int, fp32_head: bool = True
) -> torch.Tensor:
    """log pi(target) for each response token, (M,), never holding more than chunk_size rows of logits."""
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise UserError(f"logprob_chunk_size must be a positive integer, got {chunk_size!r}")
    inner = unwrap(model)
    head, scale, softcap = output_head(inner)
    keep, rows = kept_positions(model, positions, inputs["input_ids"].shape)
    extra = {} if keep is None else {"logits_to_keep": keep}
    seen, probes = [], []

    def take_hidden_states(module, args):
        # the head's log-probs are computed here, within the model's forward, where the head's weight is
        # whole even when FSDP shards it (after the forward only a shard may be left; FSDP keeps the
        # gathered weight the backward needs alive, like any weight used in a forward)
        hidden = args[0].reshape(-1, args[0].shape[-1])  # (N*K, H): what the head would multiply
        w, b = module.weight, module.bias
        seen.append(ChunkedTokenLogps.apply(hidden[rows], w, b, targets, chunk_size, scale, softcap, fp32_head))
        if inner not in _CHECKED_HEADS:
            device = hidden.device.type
            dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else w.dtype
            with torch.no_grad():  # our logits at one position, in the dtype the model's head computes in
                probes.append(
                    head_logits(hidden[:1], w.to(dtype), None if b is None else b.to(dtype), scale, softcap)[0]
                )
        return (hidden[:1],) + args[1:]  # the model's own head: 1 position

    hook = head.register_forward_pre_hook(take_hidden_states)
    try:
        out = model(**inputs, use_cache=False, **extra)
    finally:
        hook.remove()
    if len(seen) != 1:
        raise UserError(
            f"chunked log-probs: {type(inner).__name__} called its output layer {len(seen)} times "
            f"in one forward; set logprob_chunk_size to null"
        )
    if probes:
        check_head(inner, probes[0], out.logits)
        _CHECKED_HEADS.add(inner)
    return seen[0]


@torch.no_grad()
def check_head(model, ours, model_logits):
    """Our logits at one position (1, V) must be the model's: catches a final transform we don't know of."""
    theirs = model_logits.reshape(-1, model_logits.shape[-1])[:1].float()
    err = (ours - theirs).abs().max().item()
    if not err <= 1e-2 * theirs.abs().max().item() + 1e-4:
        raise UserError(
            f"chunked log-probs: {type(model).__name__}'s logits are not its lm_head applied to "
            f"its last hidden states (max difference {err:.3g}); set logprob_chunk_size to null"
        )


def head_logits(h, weight, bias, scale: float, softcap):
    """h (c, H) -> (fp32 logits (c, V), d logits / d(h W^T + b) elementwise (c, V), or None when that is
    just `scale`)."""
    z = F.linear(h.to(weight.dtype), weight, bias).float() * scale
    if softcap is None:
        return z, None
    t = torch.tanh(z / softcap)  # Gemma 2: softcap * tanh(z / softcap)
    return softcap * t, scale * (1 - t * t)


class ChunkedTokenLogps(torch.autograd.Function):
    """hidden (M, H), head weight (V, H), bias (V,) or None, targets (M,) -> log softmax(logits)[target],
    (M,) in fp32, as logit[target] - logsumexp(logits).

    Forward and backward both walk the M positions chunk_size at a time and keep nothing of a chunk's
    (chunk, V) logits once it is done: the backward recomputes them from the saved hidden states, which
    costs one more lm_head matmul (chunk by chunk) and saves the whole (M, V) logits and their gradient.
    With l = logits of one position and g the incoming gradient of its log-prob,
        d log softmax(l)[t] / d l = onehot(t) - softmax(l),
    chained through the soft-cap and scale, then into h (dl @ W), W (dl^T @ h) and b (sum of dl).
    The matmuls run in the weight's dtype (fp32_head, the default) or, with fp32_head=False, in the
    autocast dtype when autocast is on, in both passes (the backward runs outside the autocast region,
    so the dtype is recorded; autocast is switched off around the matmuls so that it can't override
    it); the weight gradient is accumulated in fp32.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size, scale, softcap, fp32_head=True):
        device = hidden.device.type
        autocast = torch.is_autocast_enabled(device) and not fp32_head
        dtype = torch.get_autocast_dtype(device) if autocast else weight.dtype
        w, b = weight.to(dtype), None if bias is None else bias.to(dtype)
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)  # (M,)
        c = chunk_size
        with torch.autocast(device, enabled=False):
            for s in range(0, hidden.shape[0], c):
                logits, _ = head_logits(hidden[s : s + c], w, b, scale, softcap)  # (c, V) fp32
                out[s : s + c] = token_logps(logits, targets[s : s + c])
        ctx.save_for_backward(hidden, weight, bias, targets)
        ctx.chunk_size, ctx.scale, ctx.softcap, ctx.dtype = chunk_size, scale, softcap, dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):  # (M,)
        hidden, weight, bias, targets = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        w, b = weight.to(ctx.dtype), None if bias is None else bias.to(ctx.dtype)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_b else None
        c = ctx.chunk_size
        with torch.autocast(hidden.device.type, enabled=False):  # the matmuls in ctx.dtype, always
            for s in range(0, hidden.shape[0], c):
                h, t, g = hidden[s : s + c], targets[s : s + c], grad_out[s : s + c, None].float()  # (c, H) (c,) (c, 1)
                logits, dlogits_draw = head_logits(h, w, b, ctx.scale, ctx.softcap)  # (c, V)
                dlogits = logits.softmax(-1).mul_(-g).scatter_add_(-1, t[:, None], g)  # g (onehot(t) - softmax)
                draw = dlogits.mul_(ctx.scale if dlogits_draw is None else dlogits_draw)  # w.r.t. h W^T + b
                if need_b:
                    grad_b += draw.sum(0)
                draw = draw.to(ctx.dtype)
                if need_h:
                    grad_h[s : s + c] = draw @ w  # (c, H)
                if need_w:
                    grad_w += (draw.T @ h.to(ctx.dtype)).float()  # (V, H)
        return (
            grad_h,
            None if grad_w is None else grad_w.to(weight.dtype),
            None if grad_b is None else grad_b.to(bias.dtype),
            None,
            None,
            None,
            None,
            None,
        )
