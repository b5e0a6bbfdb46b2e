"""Per-sequence log-probs of the padded concatenated batch against transformers' own cross-entropy,
computed one unpadded sequence at a time; the token log-prob formula against float64; the output layer in
fp32 under bf16 autocast (fp32_head) against the fp32 forward. (Every layout against a float64 forward:
tests/test_layouts.py.)"""

import copy

import pytest
import torch
from conftest import conversational_rows
from test_layouts import peaked_llama, sampled_pairs
from transformers import AutoModelForCausalLM

from dpokit.data.batch import collate_padded
from dpokit.data.layouts import collate_for
from dpokit.data.tokenize import tokenize_pair
from dpokit.logprobs import fp32_output_layer, gather_logps, sequence_logps, token_logps


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
    expected = [reference_logp(model, p.prompt_ids, p.chosen_ids) for p in pairs] + [
        reference_logp(model, p.prompt_ids, p.rejected_ids) for p in pairs
    ]
    assert torch.allclose(logps.double(), torch.tensor(expected, dtype=torch.float64), atol=1e-5, rtol=0)
    assert n_tokens.tolist() == [len(p.chosen_ids) for p in pairs] + [len(p.rejected_ids) for p in pairs]


def test_gather_logps_hand_computed():
    # vocabulary of 3, one sequence [0, 1, 2] whose last two tokens are the response
    logits = torch.tensor([[[0.0, 1.0, 0.0], [2.0, 0.0, 1.0], [0.0, 0.0, 0.0]]])
    ids = torch.tensor([[0, 1, 2]])
    mask = torch.tensor([[0, 1, 1]])
    logps, n = gather_logps(logits, ids, mask)
    expected = (1.0 - torch.logsumexp(torch.tensor([0.0, 1.0, 0.0]), 0)) + (
        1.0 - torch.logsumexp(torch.tensor([2.0, 0.0, 1.0]), 0)
    )
    assert torch.allclose(logps, expected.reshape(1)) and n.tolist() == [2]


def test_token_logps_against_float64_on_peaked_logits():
    """Real LM logits: a max ~20 nats above a 49k-entry tail. fp32 log_softmax on CPU reads high there
    (its sum of exponentials loses the tail's small terms); logit - logsumexp does not."""
    g = torch.Generator().manual_seed(0)
    logits = 5.6 * torch.randn(256, 49152, generator=g)  # (M, V), max ~24 above the mean
    targets = logits.argmax(-1)
    expected = logits.double().log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)
    err = token_logps(logits, targets).double() - expected
    assert err.abs().max() < 3e-6 and abs(err.mean()) < 2e-7


# --- the output layer in fp32 under bf16 autocast -----------------------------------------------------------


def bf16_and_fp32_logps(model, batch, **kw):
    """(fp32 log-probs, bf16-autocast log-probs with the given sequence_logps keywords), both (2B,)."""
    with torch.no_grad():
        fp32, _ = sequence_logps(model, batch, **kw)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16, _ = sequence_logps(model, batch, **kw)
    return fp32, bf16


@pytest.fixture(scope="module")
def peaked(smol_tokenizer):
    """The peaked 49k-vocabulary Llama of test_layouts and 100-token responses it sampled itself."""
    model = peaked_llama(len(smol_tokenizer))
    return model, sampled_pairs(model, smol_tokenizer, length=100)


@pytest.mark.parametrize(
    "layout,chunk", [("padded", None), ("packed", None), ("padded", 5), ("prefix_shared_packed", 5)]
)
def test_fp32_head_under_bf16_autocast(peaked, smol_tokenizer, layout, chunk):
    """Under bf16 autocast the model's own lm_head rounds every logit to bf16 (~0.04 on a logit of 10):
    0.20-0.25 nats of error per 100-token sequence on average, up to 0.44 (measured). The fp32 head (the
    default) leaves only the bf16 trunk's error: 0.035 on average, up to 0.073."""
    model, pairs = peaked
    batch = collate_for(layout, smol_tokenizer.pad_token_id)(pairs)
    fp32, bf16 = bf16_and_fp32_logps(model, batch, chunk_size=chunk)
    _, old = bf16_and_fp32_logps(model, batch, chunk_size=chunk, fp32_head=False)
    err, old_err = (bf16 - fp32).abs(), (old - fp32).abs()
    assert err.max() < 0.1 and err.mean() < 0.05, (err.max(), err.mean())
    assert old_err.max() > 0.3 and old_err.mean() > 0.15, (old_err.max(), old_err.mean())


def test_fp32_head_changes_nothing_without_autocast(peaked, smol_tokenizer):
    model, pairs = peaked
    batch = collate_for("padded", smol_tokenizer.pad_token_id)(pairs)
    with torch.no_grad():
        a, _ = sequence_logps(model, batch)
        b, _ = sequence_logps(model, batch, fp32_head=False)
    assert torch.equal(a, b)
    with fp32_output_layer(model), torch.autocast("cpu", dtype=torch.bfloat16):
        assert model.lm_head._forward_hooks == {}  # entered outside autocast: nothing to do
    assert model.lm_head._forward_hooks == {} and model.lm_head._forward_pre_hooks == {}


def test_fp32_head_gradients_under_bf16_autocast(peaked, smol_tokenizer):
    """The gradient flows through our fp32 head into the hidden states and the head weight, as through
    the model's own; the chunked head's hand-written backward gives the same."""
    model, pairs = peaked
    pairs = pairs[:2]
    batch = collate_for("packed", smol_tokenizer.pad_token_id)(pairs)
    params = [model.lm_head.weight, model.model.layers[0].mlp.down_proj.weight]
    fp32 = torch.autograd.grad(sequence_logps(model, batch)[0].sum(), params)
    for chunk in (None, 5):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logps, _ = sequence_logps(model, batch, chunk_size=chunk)
        grads = torch.autograd.grad(logps.sum(), params)
        for g, e in zip(grads, fp32):
            assert g.dtype == torch.float32
            assert (g - e).norm() < 0.05 * e.norm(), chunk


def test_fp32_head_with_a_lora_adapter_on_the_head(peaked, smol_tokenizer):
    """A head that is not a plain nn.Linear (PEFT's LoRA on lm_head) is run in fp32 by its own forward."""
    peft = pytest.importorskip("peft")
    model, pairs = peaked
    wrapped = peft.get_peft_model(
        copy.deepcopy(model), peft.LoraConfig(r=2, target_modules=["lm_head"], init_lora_weights=False)
    )
    batch = collate_for("padded", smol_tokenizer.pad_token_id)(pairs)
    fp32, bf16 = bf16_and_fp32_logps(wrapped, batch)
    _, old = bf16_and_fp32_logps(wrapped, batch, fp32_head=False)
    assert (bf16 - fp32).abs().max() < 0.15 < (old - fp32).abs().max()
