"""Every batch layout (padded, packed, prefix-shared, prefix-shared + packed), with and without chunked
log-probs: against a float64 forward of the same model (realistic vocabulary and logit spread, 200-token
responses) to 1e-4 per sequence; against the padded layout: the same log-probs to 1e-4 in fp32, the same
token counts, and the same loss and parameter gradients for every preference loss. Plus the layouts'
bookkeeping by hand, and a check that the chunked path never holds more than chunk_size rows of logits."""

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import conversational_rows
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM, Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM
from transformers.masking_utils import find_packed_sequence_indices

from dpokit.data.batch import collate_padded
from dpokit.data.layouts import (
    CHOSEN,
    LAYOUTS,
    PROMPT,
    REJECTED,
    collate_for,
    collate_packed,
    collate_prefix_shared,
    layout_name,
    prefix_shared_mask,
)
from dpokit.data.tokenize import TokenizedPair, tokenize_pair
from dpokit.errors import UserError
from dpokit.logprobs import ChunkedTokenLogps, check_attention_layers, sequence_logps
from dpokit.losses import LOSSES

VOCAB = 97
CHUNK = 5  # divides none of the response-token counts below: the last chunk is a partial one
SETTINGS = [(layout, chunk) for layout in LAYOUTS for chunk in (None, CHUNK)]


def tiny_llama(attn="sdpa", tie=False, seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=tie,
        attn_implementation=attn,
    )
    return LlamaForCausalLM(cfg).float()


def random_pairs(lengths, seed=1):
    """TokenizedPairs of random tokens with the given (prompt, chosen, rejected) lengths."""
    g = torch.Generator().manual_seed(seed)
    ids = lambda n: torch.randint(1, VOCAB, (n,), generator=g).tolist()  # noqa: E731
    return [TokenizedPair(ids(p), ids(c), ids(r), row=i) for i, (p, c, r) in enumerate(lengths)]


UNEVEN = [(5, 7, 3), (1, 2, 9), (12, 4, 4), (3, 11, 1)]


# --- bookkeeping, by hand ------------------------------------------------------------------------------


def test_packed_layout_by_hand():
    pairs = [TokenizedPair([1, 2], [3, 4, 5], [6]), TokenizedPair([7], [8], [9, 10])]
    b = collate_packed(pairs)
    # chosen sequences first, then rejected: [1 2 3 4 5 | 7 8 | 1 2 6 | 7 9 10]
    assert b["input_ids"].tolist() == [[1, 2, 3, 4, 5, 7, 8, 1, 2, 6, 7, 9, 10]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 0, 1, 2, 0, 1, 2]]
    assert b["logit_positions"].tolist() == [1, 2, 3, 5, 8, 10, 11]
    assert b["target_ids"].tolist() == [3, 4, 5, 8, 6, 9, 10]
    assert b["target_sequence"].tolist() == [0, 0, 0, 1, 2, 3, 3]
    assert b["num_examples"] == 2 and b["num_tokens"] == 13 and "attention_mask" not in b
    # transformers finds the same sequences from the position ids alone
    assert torch.equal(find_packed_sequence_indices(b["position_ids"]), b["sequence_ids"])


def test_prefix_shared_layout_by_hand():
    pairs = [TokenizedPair([1, 2], [3, 4, 5], [6]), TokenizedPair([7], [8], [9, 10])]
    b = collate_prefix_shared(pairs, pad_id=0)
    assert b["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 0, 0]]
    # rejected starts at position len(prompt), as chosen does
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 4, 2], [0, 1, 1, 2, 0, 0]]
    assert b["segment_ids"].tolist() == [
        [PROMPT, PROMPT, CHOSEN, CHOSEN, CHOSEN, REJECTED],
        [PROMPT, CHOSEN, REJECTED, REJECTED, -1, -1],
    ]
    # the first rejected token (6; 9) is predicted from the last prompt token (flat 1; 6), not from chosen
    assert b["logit_positions"].tolist() == [1, 2, 3, 1, 6, 6, 8]
    assert b["target_ids"].tolist() == [3, 4, 5, 6, 8, 9, 10]
    assert b["target_sequence"].tolist() == [0, 0, 0, 2, 1, 3, 3]
    assert b["num_tokens"] == 10
    packed = collate_prefix_shared(pairs, pad_id=0, packed=True)
    assert packed["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]]
    assert packed["logit_positions"].tolist() == [1, 2, 3, 1, 6, 6, 8]
    assert packed["sequence_ids"].tolist() == [[0] * 6 + [1] * 4]


def test_prefix_shared_mask_by_hand():
    # one block [p p c c r r] and a padding token
    seq = torch.tensor([[0, 0, 0, 0, 0, 0, -1]])
    seg = torch.tensor([[PROMPT, PROMPT, CHOSEN, CHOSEN, REJECTED, REJECTED, -1]])
    expected = torch.tensor(
        [
            # p  p  c  c  r  r  pad
            [1, 0, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0, 0],
            [1, 1, 1, 1, 0, 0, 0],
            [1, 1, 0, 0, 1, 0, 0],  # rejected: the prompt and itself, never chosen
            [1, 1, 0, 0, 1, 1, 0],
            [0, 0, 0, 0, 0, 0, 1],  # padding: only itself, so no softmax row is empty
        ],
        dtype=torch.bool,
    )
    assert torch.equal(prefix_shared_mask(seq, seg)[0, 0], expected)


def test_layout_names():
    assert [layout_name(f, p) for p in (False, True) for f in (False, True)] == list(LAYOUTS)
    with pytest.raises(ValueError, match="unknown batch layout"):
        collate_for("ragged", 0)


# --- the contract: every layout gives the padded layout's numbers --------------------------------------


@pytest.mark.parametrize("layout,chunk", SETTINGS)
def test_logps_match_padded_on_real_pairs(tiny_model_dir, smol_tokenizer, layout, chunk):
    """The tiny Llama with the real tokenizer and chat template, tied embeddings, uneven lengths."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    pairs = [tokenize_pair(smol_tokenizer, r) for r in conversational_rows(4)]
    pairs[1].chosen_ids = pairs[1].chosen_ids * 3
    pairs[2].rejected_ids = pairs[2].rejected_ids * 2
    pad = smol_tokenizer.pad_token_id
    with torch.no_grad():
        expected, expected_n = sequence_logps(model, collate_padded(pairs, pad))
        logps, n = sequence_logps(model, collate_for(layout, pad)(pairs), chunk_size=chunk)
    assert torch.allclose(logps, expected, atol=1e-4, rtol=0)
    assert n.tolist() == expected_n.tolist()


def peaked_llama(vocab_size, hidden_size=32, head_std=1.0, seed=0, **kw):
    """A 2-layer random Llama whose next-token distributions look like a trained model's: a 49k
    vocabulary (the embedded tokenizer's), logits with a spread of ~5.6 and a max ~24 above their mean
    (SmolLM2-135M on chat text: 3.5 and 21), from an untied head of std head_std. fp32, eval mode."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=3 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        **kw,
    )
    model = LlamaForCausalLM(cfg).float().eval()
    with torch.no_grad():
        model.lm_head.weight.normal_(0, head_std)
    return model


def sampled_pairs(model, tokenizer, n_pairs=4, length=200, seed=1):
    """Pairs whose chosen and rejected responses the model itself sampled (up to length tokens
    each): likely tokens, ~-2.3 nats each, as in real preference data, not random ones at ~-24."""
    from dpokit.sampling import sample_responses

    prompts = [tokenize_pair(tokenizer, r).prompt_ids for r in conversational_rows(n_pairs)]
    torch.manual_seed(seed)
    responses = sample_responses(model, tokenizer, prompts * 2, length, batch_size=2 * n_pairs)
    return [
        TokenizedPair(p, c, r, row=i)
        for i, (p, c, r) in enumerate(zip(prompts, responses[:n_pairs], responses[n_pairs:]))
    ]


@torch.no_grad()
def float64_logps(model, pairs) -> torch.Tensor:
    """(2B,) float64: the same model in float64, one unpadded sequence at a time, float64 log-softmax
    and sum. Independent of dpokit.logprobs."""
    model64 = copy.deepcopy(model).double()
    out = []
    for response in ("chosen_ids", "rejected_ids"):
        for p in pairs:
            r = getattr(p, response)
            logits = model64(input_ids=torch.tensor([p.prompt_ids + r])).logits[0, len(p.prompt_ids) - 1 : -1]
            out.append(logits.log_softmax(-1).gather(-1, torch.tensor(r)[:, None]).sum())
    return torch.stack(out)


@pytest.fixture(scope="module")
def peaked_model_and_pairs(smol_tokenizer):
    model = peaked_llama(len(smol_tokenizer))
    pairs = sampled_pairs(model, smol_tokenizer)
    return model, pairs, float64_logps(model, pairs)


@pytest.mark.parametrize("layout,chunk", SETTINGS)
def test_logps_match_float64(peaked_model_and_pairs, smol_tokenizer, layout, chunk):
    """Each layout, chunked or not, against float64 (not only against each other): fp32 log_softmax on
    CPU reads ~3e-6 high per token on such distributions (5e-4 over 200 tokens) and an fp32 running sum
    drifts; logit - logsumexp with a float64 sum stays within 1e-4 (measured: <= 7e-5)."""
    model, pairs, expected = peaked_model_and_pairs
    assert all(len(p.chosen_ids) == len(p.rejected_ids) == 200 for p in pairs)
    assert -3.5 < float(expected.mean()) / 200 < -1.5  # likely tokens, as in real data
    with torch.no_grad():
        logps, n = sequence_logps(model, collate_for(layout, smol_tokenizer.pad_token_id)(pairs), chunk_size=chunk)
    assert n.tolist() == [200] * 8
    err = (logps.double() - expected).abs().max().item()
    assert err <= 1e-4, f"{layout}, chunk {chunk}: {err:.2e} from float64"


def close_to(got, expected, rel=1e-4):
    """Equal up to fp32 rounding, relative to the tensor's largest entry (gradients span many scales)."""
    return bool((got - expected).abs().max() <= rel * expected.abs().max() + 1e-7)


def dpo_terms(model, reference, batch, chunk):
    """The DPO step's inputs: policy logps with grad, reference logps without, response lengths."""
    B = batch["num_examples"]
    logps, n = sequence_logps(model, batch, chunk_size=chunk)
    with torch.no_grad():
        ref, _ = sequence_logps(reference, batch, chunk_size=chunk)
    return (logps[:B], logps[B:], ref[:B], ref[B:]), {"chosen_lengths": n[:B], "rejected_lengths": n[B:]}


def losses_and_grads(model, reference, batch, chunk):
    """{loss name: (mean loss, [grad of every parameter])}, every loss of dpokit.losses."""
    logps, lengths = dpo_terms(model, reference, batch, chunk)
    params = [p for p in model.parameters() if p.requires_grad]
    out = {}
    for name, spec in LOSSES.items():
        loss = spec(*logps, beta=0.1, **lengths)[0].mean()
        out[name] = (loss.detach(), torch.autograd.grad(loss, params, retain_graph=True))
    return out


@pytest.mark.parametrize("attn,tie", [("sdpa", False), ("eager", True)])
def test_losses_and_gradients_match_padded(attn, tie):
    policy = tiny_llama(attn, tie)
    reference = copy.deepcopy(policy).requires_grad_(False)
    with torch.no_grad():  # so the log-ratios are not all zero
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    pairs = random_pairs(UNEVEN)
    expected = losses_and_grads(policy, reference, collate_padded(pairs, 0), None)
    for layout, chunk in SETTINGS:
        got = losses_and_grads(policy, reference, collate_for(layout, 0)(pairs), chunk)
        for name, (loss, grads) in expected.items():
            assert torch.allclose(got[name][0], loss, atol=1e-5, rtol=1e-5), (layout, chunk, name)
            for g, e in zip(got[name][1], grads):
                assert close_to(g, e), (layout, chunk, name)


def test_gemma2_softcap_and_sliding_window():
    """Logit soft-capping (applied by the chunked head from the config) and alternating sliding-window
    layers (the packed mask is transformers' own; prefix-shared sequences fit in the window)."""
    torch.manual_seed(0)
    cfg = Gemma2Config(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        query_pre_attn_scalar=8,
        sliding_window=8,
        final_logit_softcapping=0.5,
        max_position_embeddings=128,
        attn_implementation="eager",
    )
    model = Gemma2ForCausalLM(cfg).float()
    pairs = random_pairs(UNEVEN)
    expected, _ = sequence_logps(model, collate_padded(pairs, 0))
    grad = torch.autograd.grad(expected.sum(), model.lm_head.weight)[0]
    for layout, chunk in SETTINGS:
        if layout.startswith("prefix_shared"):
            continue  # 16-token sequences are longer than the window: refused, tested below
        logps, _ = sequence_logps(model, collate_for(layout, 0)(pairs), chunk_size=chunk)
        assert torch.allclose(logps, expected, atol=1e-4, rtol=0), (layout, chunk)
        got = torch.autograd.grad(logps.sum(), model.lm_head.weight)[0]
        assert close_to(got, grad), (layout, chunk)
    with pytest.raises(UserError, match="sliding window"):
        sequence_logps(model, collate_for("prefix_shared", 0)(pairs))
    short = random_pairs([(3, 4, 5), (6, 2, 2)])
    expected, _ = sequence_logps(model, collate_padded(short, 0))
    logps, _ = sequence_logps(model, collate_for("prefix_shared_packed", 0)(short), chunk_size=CHUNK)
    assert torch.allclose(logps, expected, atol=1e-4, rtol=0)


# --- the chunked head -----------------------------------------------------------------------------------


@pytest.mark.parametrize("bias,scale,softcap", [(False, 1.0, None), (True, 0.25, None), (True, 2.0, 3.0)])
def test_chunked_head_matches_autograd(bias, scale, softcap):
    torch.manual_seed(0)
    h = torch.randn(11, 8, requires_grad=True)
    w = torch.randn(VOCAB, 8, requires_grad=True)
    b = torch.randn(VOCAB, requires_grad=True) if bias else None
    t = torch.randint(0, VOCAB, (11,))
    g = torch.randn(11)
    z = F.linear(h, w, b) * scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    expected = z.log_softmax(-1).gather(-1, t[:, None]).squeeze(-1)
    got = ChunkedTokenLogps.apply(h, w, b, t, 4, scale, softcap)
    assert torch.allclose(got, expected, atol=1e-5)
    inputs = [h, w] + ([b] if bias else [])
    for x, y in zip(torch.autograd.grad(got, inputs, g), torch.autograd.grad(expected, inputs, g)):
        assert torch.allclose(x, y, atol=1e-5)


class WidestLogits(TorchDispatchMode):
    """Records the most rows any (..., V)-shaped tensor holds, forward and backward, except the (H, V)
    transposed head weight that the matmuls use."""

    def __init__(self, hidden_size):
        super().__init__()
        self.rows, self.hidden_size = 0, hidden_size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if (
                isinstance(t, torch.Tensor)
                and t.dim() >= 2
                and t.shape[-1] == VOCAB
                and tuple(t.shape) != (self.hidden_size, VOCAB)
            ):
                self.rows = max(self.rows, t.numel() // VOCAB)
        return out


@pytest.mark.parametrize("layout", LAYOUTS)
def test_chunked_never_holds_more_than_a_chunk_of_logits(layout):
    model = tiny_llama(tie=True)
    batch = collate_for(layout, 0)(random_pairs(UNEVEN))
    H, lm_head_rows = model.config.hidden_size, []
    model.lm_head.register_forward_hook(lambda m, args, out: lm_head_rows.append(args[0].numel() // H))
    with WidestLogits(H) as widest:
        logps, n = sequence_logps(model, batch, chunk_size=CHUNK)
        logps.sum().backward()
    assert int(n.sum()) > 4 * CHUNK and max(lm_head_rows) <= CHUNK and widest.rows <= CHUNK
    with WidestLogits(H) as widest:  # the detector's own check: unchunked, the logits are wide
        sequence_logps(model, batch)[0].sum().backward()
    assert widest.rows >= int(n.sum())


@pytest.mark.parametrize("fp32_head", [True, False])
def test_chunked_under_bf16_autocast(fp32_head):
    """The chunked head under autocast matches the unchunked path: both in fp32 (fp32_head), or both in
    the autocast dtype, in forward and backward (the backward runs outside autocast)."""
    model = tiny_llama()
    batch = collate_for("packed", 0)(random_pairs(UNEVEN))
    grads = []
    for chunk in (None, CHUNK):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logps, _ = sequence_logps(model, batch, chunk_size=chunk, fp32_head=fp32_head)
        grads.append(torch.autograd.grad(logps.sum(), model.lm_head.weight)[0])
        assert logps.dtype == torch.float32 and grads[-1].dtype == torch.float32
        if chunk is None:
            expected = logps.detach()
    assert torch.allclose(logps, expected, atol=0.05, rtol=0.01)
    assert torch.allclose(grads[1], grads[0], atol=0.05, rtol=0.05)


# --- what is refused, clearly -----------------------------------------------------------------------------


class DoubledLogits(LlamaForCausalLM):
    """A model that transforms its logits in a way the chunked head can't know of."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits * 2
        return out


def test_refusals():
    pairs = random_pairs(UNEVEN)
    model = DoubledLogits(tiny_llama().config)
    with pytest.raises(UserError, match="not its lm_head"):
        sequence_logps(model, collate_packed(pairs), chunk_size=CHUNK)
    model = tiny_llama()
    model.lm_head = torch.nn.Sequential(model.lm_head)
    with pytest.raises(UserError, match="plain nn.Linear"):
        sequence_logps(model, collate_packed(pairs), chunk_size=CHUNK)
    with pytest.raises(UserError, match="positive integer"):
        sequence_logps(tiny_llama(), collate_packed(pairs), chunk_size=0)
    with pytest.raises(UserError, match="sdpa or eager"):
        check_attention_layers(LlamaConfig(attn_implementation="flash_attention_2"), "prefix_shared", 10)
    hybrid = LlamaConfig(attn_implementation="sdpa")
    hybrid.layer_types = ["full_attention", "linear_attention"]
    with pytest.raises(UserError, match="linear_attention"):
        check_attention_layers(hybrid, "packed", 10)


def test_lora_policy_and_its_disabled_adapters():
    """A PEFT-wrapped policy (frozen lm_head: no weight gradient is computed) and its base as the
    reference, with the adapters disabled."""
    peft = pytest.importorskip("peft")
    base = tiny_llama(tie=True)
    model = peft.get_peft_model(
        base, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    pairs = random_pairs(UNEVEN)
    params = [p for p in model.parameters() if p.requires_grad]
    expected, _ = sequence_logps(model, collate_padded(pairs, 0))
    expected_grads = torch.autograd.grad(expected.sum(), params)
    logps, _ = sequence_logps(model, collate_for("prefix_shared_packed", 0)(pairs), chunk_size=CHUNK)
    assert torch.allclose(logps, expected, atol=1e-4, rtol=0)
    assert all(close_to(g, e) for g, e in zip(torch.autograd.grad(logps.sum(), params), expected_grads))
    with torch.no_grad(), model.disable_adapter():
        logps, _ = sequence_logps(model, collate_for("packed", 0)(pairs), chunk_size=CHUNK)
        expected, _ = sequence_logps(base, collate_padded(pairs, 0))
    assert torch.allclose(logps, expected, atol=1e-4, rtol=0)
