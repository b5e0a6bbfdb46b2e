"""The RLHF pipeline DPO replaces: sft -> rm -> generate -> pairs -> dpo, and rl (PPO / RLOO).

Each stage trains a few steps on a tiny random model; the math is checked against numbers computed
here by hand or independently: the Bradley-Terry loss from the reward model's own outputs, GAE and the
clipped PPO objectives from hand-worked values, and the sampled KL estimate against the exact KL of a
tiny model whose every response can be enumerated.
"""

import json
import math
from types import SimpleNamespace

import pytest
import torch
from conftest import REVIEWS, conversational_rows, standard_rows, write_jsonl
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, LlamaConfig, LlamaForCausalLM

from dpokit.cli import main
from dpokit.commands.evaluate import sampled_kl, win_rate
from dpokit.commands.pairs import make_pairs
from dpokit.commands.rl import RLConfig
from dpokit.commands.sft import SFTConfig
from dpokit.config import load_config
from dpokit.data.batch import collate_padded
from dpokit.data.prompts import load_demonstrations, load_prompts, tokenize_demonstrations, tokenize_prompt
from dpokit.data.tokenize import TokenizedPair, tokenize_pair
from dpokit.logprobs import sequence_logps
from dpokit.rl_losses import (
    KLController,
    gae,
    kl_penalised_rewards,
    masked_whiten,
    ppo_policy_loss,
    ppo_value_loss,
    rloo_advantages,
)
from dpokit.sampling import sample_responses
from dpokit.train import loop
from dpokit.train.metrics import MetricSums
from dpokit.train.rl_step import response_batch, token_stats
from dpokit.train.rm_step import RewardStep
from dpokit.train.runtime import Ranks
from dpokit.train.sft_step import SFTStep, collate_sft

COMMON = ["max_steps=6", "logging_steps=1", "learning_rate=1e-2", "progress_bar=false"]


def rows_of(path):
    return [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]


def train_rows(out):
    return [r for r in rows_of(out / "metrics.jsonl") if "loss" in r and "step" in r]


def eval_rows(out):
    return [r for r in rows_of(out / "metrics.jsonl") if "eval/loss" in r]


@pytest.fixture
def tiny(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)


# --- sft ---------------------------------------------------------------------------------------------------


def test_sft_formats_tokenize_like_dpo_chosen(tmp_path, smol_tokenizer):
    """prompt+completion, messages (last assistant turn) and preference rows give DPO's exact tokens."""
    p, c, r = REVIEWS[0]
    user, assistant = [{"role": "user", "content": p}], [{"role": "assistant", "content": c}]
    files = {
        "completion": write_jsonl(tmp_path / "a.jsonl", [{"prompt": user, "completion": assistant}]),
        "messages": write_jsonl(tmp_path / "b.jsonl", [{"messages": user + assistant}]),
        "preference": write_jsonl(tmp_path / "c.jsonl", conversational_rows(1)),
    }
    expected = tokenize_pair(smol_tokenizer, conversational_rows(1)[0])
    for name, path in files.items():
        rows, label, _ = load_demonstrations(str(path))
        (ex,), _ = tokenize_demonstrations(smol_tokenizer, rows, label, None, None, "keep_end")
        assert (ex.prompt_ids, ex.chosen_ids) == (expected.prompt_ids, expected.chosen_ids), name
        assert ex.chosen_ids[-1] == smol_tokenizer.eos_token_id
        assert tokenize_prompt(smol_tokenizer, user) == expected.prompt_ids  # what generation is fed
    ((row, prompt),) = load_prompts(str(files["messages"]))[0]
    assert prompt == user


def test_sft_loss_is_the_completion_nll(tiny, smol_tokenizer):
    """Per-sequence mean NLL of the completion tokens = transformers' own loss with the prompt masked out;
    the packed layout and chunked log-probs give the same; accumulation equals the big batch."""
    examples = [tokenize_pair(smol_tokenizer, r) for r in standard_rows(4)]
    examples[1].chosen_ids = examples[1].chosen_ids * 3  # uneven lengths
    pad = smol_tokenizer.pad_token_id
    step = SFTStep(SFTConfig(dataset="x"))
    losses, metrics = step(tiny, collate_sft(examples, pad))
    for e, loss in zip(examples, losses):
        ids = torch.tensor([e.prompt_ids + e.chosen_ids])
        labels = torch.tensor([[-100] * len(e.prompt_ids) + e.chosen_ids])
        assert loss.item() == pytest.approx(tiny(input_ids=ids, labels=labels).loss.item(), rel=1e-5)
    packed, _ = step(tiny, collate_sft(examples, pad, packed=True))
    chunked, _ = SFTStep(SFTConfig(dataset="x", logprob_chunk_size=5))(tiny, collate_sft(examples, pad))
    assert torch.allclose(losses, packed, atol=1e-4) and torch.allclose(losses, chunked, atol=1e-4)
    n = torch.tensor([float(len(e.chosen_ids)) for e in examples])
    assert torch.equal(metrics["nll"][1], n)  # the logged nll is weighted by completion tokens

    for normalization in ("sequence", "sum"):
        step = SFTStep(SFTConfig(dataset="x", loss_normalization=normalization))
        grads = []
        for size in (4, 3):  # 3 + 1: uneven micro-batches
            tiny.zero_grad()
            micro = [collate_sft(examples[i : i + size], pad) for i in range(0, 4, size)]
            loop.forward_backward(tiny, step, micro, Ranks(), "fp32", MetricSums())
            grads.append([p.grad.clone() for p in tiny.parameters()])
        for g in grads[1:]:
            assert all(torch.allclose(a, b, atol=1e-6, rtol=1e-4) for a, b in zip(grads[0], g)), normalization


def test_sft_trains_and_its_output_is_a_dpo_reference(tiny_model_dir, pref_dir, tmp_path):
    out = tmp_path / "sft"
    assert (
        main(
            [
                "sft",
                f"model={tiny_model_dir}",
                f"dataset={pref_dir}",
                f"output_dir={out}",
                "per_device_train_batch_size=4",
                *COMMON,
            ]
        )
        == 0
    )
    ev = eval_rows(out)
    assert ev[-1]["eval/loss"] < ev[0]["eval/loss"] - 0.5  # memorisable data: the NLL goes down
    assert all(k in train_rows(out)[0] for k in ("loss", "nll", "completion_tokens", "grad_norm"))
    AutoModelForCausalLM.from_pretrained(out)
    dpo = tmp_path / "dpo"  # the SFT model as policy and (default) reference
    assert (
        main(
            [
                "dpo",
                f"model={out}",
                f"dataset={pref_dir}",
                f"output_dir={dpo}",
                "max_steps=1",
                "progress_bar=false",
                "max_eval_examples=2",
            ]
        )
        == 0
    )
    assert eval_rows(dpo)[0]["eval/rewards/accuracies"] == 0.5  # pi = pi_ref at the start


# --- reward model ---------------------------------------------------------------------------------------------


def test_reward_model_loss_is_bradley_terry(tiny_model_dir, smol_tokenizer):
    """The step's loss = -log sigmoid(r_w - r_l) with r read from the model's own output on each sequence
    alone (no padding), by plain float arithmetic."""
    rm = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1, dtype=torch.float32)
    rm.config.pad_token_id = smol_tokenizer.pad_token_id
    torch.nn.init.normal_(rm.score.weight, std=1.0)  # rewards far enough apart to be a real test
    pairs = [tokenize_pair(smol_tokenizer, r) for r in conversational_rows(3)]
    pairs[2].chosen_ids = pairs[2].chosen_ids * 2
    losses, metrics = RewardStep(SimpleNamespace(center_rewards_coefficient=0.0))(
        rm, collate_padded(pairs, smol_tokenizer.pad_token_id)
    )
    with torch.no_grad():
        for i, p in enumerate(pairs):
            r_w = rm(input_ids=torch.tensor([p.prompt_ids + p.chosen_ids])).logits[0, 0].item()
            r_l = rm(input_ids=torch.tensor([p.prompt_ids + p.rejected_ids])).logits[0, 0].item()
            assert losses[i].item() == pytest.approx(-math.log(1 / (1 + math.exp(-(r_w - r_l)))), rel=1e-4, abs=1e-6)
            assert metrics["rewards/margins"][i].item() == pytest.approx(r_w - r_l, abs=1e-4)
            assert metrics["accuracy"][i].item() == float(r_w > r_l)


def test_reward_model_trains_saves_and_scores(tiny_model_dir, pref_dir, tmp_path):
    out = tmp_path / "rm"
    assert (
        main(
            [
                "rm",
                f"model={tiny_model_dir}",
                f"dataset={pref_dir}",
                f"output_dir={out}",
                "per_device_train_batch_size=4",
                *COMMON,
            ]
        )
        == 0
    )
    ev = eval_rows(out)
    assert ev[-1]["eval/loss"] < ev[0]["eval/loss"] and ev[-1]["eval/accuracy"] == 1.0  # held-out pairs
    assert all(k in train_rows(out)[0] for k in ("accuracy", "rewards/chosen", "rewards/rejected", "rewards/margins"))
    from dpokit.rewards import get_reward_fn

    fn = get_reward_fn(f"rm:{out}")
    prompts = [r["prompt"] for r in conversational_rows(4)]
    good, bad = fn(prompts, [c for _, c, _ in REVIEWS[:4]]), fn(prompts, [r for _, _, r in REVIEWS[:4]])
    assert all(g > b for g, b in zip(good, bad))
    # the saved model, loaded by transformers alone, gives the same rewards
    rm = AutoModelForSequenceClassification.from_pretrained(out)
    y = [{"role": "assistant", "content": REVIEWS[0][1]}]
    p = tokenize_pair(fn.tokenizer, {"prompt": prompts[0], "chosen": y, "rejected": y})
    with torch.no_grad():
        reward = rm(input_ids=torch.tensor([p.prompt_ids + p.chosen_ids])).logits[0, 0].item()
    assert reward == pytest.approx(good[0], abs=1e-5)


# --- generate and pairs ----------------------------------------------------------------------------------------


def test_make_pairs_orders_by_reward_and_drops_ties():
    responses, rewards = ["a", "b", "c", "d"], [0.5, 0.9, 0.5, 0.1]
    pairs, ties = make_pairs(responses, rewards, "all_pairs", 0.0)
    assert ties == 1 and len(pairs) == 5  # a-c tie dropped
    assert all(rw > rl for _, _, rw, rl in pairs)
    assert make_pairs(responses, rewards, "best_vs_worst", 0.0) == ([("b", "d", 0.9, 0.1)], 0)
    assert make_pairs(responses, rewards, "all_pairs", 0.4)[0] == [("b", "d", 0.9, 0.1)]
    assert make_pairs(["a", "b"], [1.0, 1.0], "best_vs_worst", 0.0) == ([], 1)


def first_char_reward(prompts, responses):
    """A deterministic reward for the tests (`test_pipeline:first_char_reward`)."""
    return [float(ord(r[0]) % 7) if r else -1.0 for r in responses]


def test_generate_pairs_dpo(tiny_model_dir, tmp_path):
    prompts = write_jsonl(
        tmp_path / "prompts.jsonl", [{"messages": [{"role": "user", "content": p}]} for p, _, _ in REVIEWS[:6]]
    )
    samples = tmp_path / "samples.jsonl"
    assert (
        main(
            [
                "generate",
                f"model={tiny_model_dir}",
                f"dataset={prompts}",
                f"output_file={samples}",
                "num_samples_per_prompt=4",
                "max_new_tokens=6",
                "seed=1",
            ]
        )
        == 0
    )
    rows = rows_of(samples)
    assert len(rows) == 6 and all(len(r["responses"]) == 4 == len(r["finished"]) for r in rows)
    assert rows[0]["prompt"] == [{"role": "user", "content": REVIEWS[0][0]}]
    again = tmp_path / "again.jsonl"
    main(
        [
            "generate",
            f"model={tiny_model_dir}",
            f"dataset={prompts}",
            f"output_file={again}",
            "num_samples_per_prompt=4",
            "max_new_tokens=6",
            "seed=1",
        ]
    )
    assert rows_of(again) == rows  # seeded
    out = tmp_path / "pairs"
    assert (
        main(
            [
                "pairs",
                f"samples={samples}",
                "reward=test_pipeline:first_char_reward",
                f"output={out}",
                "drop_unfinished=false",
                "test_fraction=0.34",
            ]
        )
        == 0
    )
    train, test = rows_of(out / "train.jsonl"), rows_of(out / "test.jsonl")
    assert train and test and len(test) < len(train)
    assert not {json.dumps(r["prompt"]) for r in train} & {json.dumps(r["prompt"]) for r in test}
    for r in train + test:
        assert r["score_chosen"] > r["score_rejected"]
        assert r["chosen"][0]["role"] == "assistant" and r["chosen"] != r["rejected"]
    dpo = tmp_path / "dpo"
    assert (
        main(
            [
                "dpo",
                f"model={tiny_model_dir}",
                f"dataset={out}",
                f"output_dir={dpo}",
                "max_steps=2",
                "per_device_train_batch_size=2",
                "progress_bar=false",
            ]
        )
        == 0
    )
    assert len(eval_rows(dpo)) == 2 and (dpo / "model.safetensors").is_file()
    report = tmp_path / "eval.json"  # the trained policy against its reference, judged by the same reward
    assert (
        main(
            [
                "eval",
                f"model={dpo}",
                f"ref_model={tiny_model_dir}",
                f"dataset={out}",
                f"output_file={report}",
                "reward=test_pipeline:first_char_reward",
                "num_samples=4",
                "max_new_tokens=4",
            ]
        )
        == 0
    )
    policy = json.loads(report.read_text())["policy"]
    assert 0 <= policy["win_rate"] <= 1 and "win_rate_se" in policy


def test_win_rate_counts_ties_half():
    rate, se = win_rate([1.0, 0.0, 2.0, 5.0], [0.0, 0.0, 3.0, 1.0])  # win, tie, loss, win
    assert rate == pytest.approx(2.5 / 4)
    assert se == pytest.approx(math.sqrt(sum((x - 0.625) ** 2 for x in (1, 0.5, 0, 1)) / 3 / 4))


# --- the KL estimator on an enumerable toy ----------------------------------------------------------------------


def toy_model(seed):
    """A 1-layer Llama over 3 tokens (2 = EOS) with sharp, seed-dependent next-token distributions."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=3,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=2,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        model.model.embed_tokens.weight.normal_(0, 1.0)
        model.lm_head.weight.normal_(0, 0.4)
    return model


@torch.no_grad()
def exact_distribution(model, prompt):
    """Every response of at most 2 tokens (ending at EOS = 2, or cut at 2 tokens) -> its log-probability."""

    def next_logps(ids):
        return model(input_ids=torch.tensor([ids])).logits[0, -1].log_softmax(-1).tolist()

    out, first = {}, next_logps(prompt)
    for a in range(3):
        if a == 2:
            out[(a,)] = first[a]
            continue
        second = next_logps(prompt + [a])
        for b in range(3):
            out[(a, b)] = first[a] + second[b]
    return out


def test_sampled_kl_matches_exact_kl():
    policy, reference = toy_model(1), toy_model(2)
    prompt = [0]
    p, q = exact_distribution(policy, prompt), exact_distribution(reference, prompt)
    assert sum(math.exp(v) for v in p.values()) == pytest.approx(1.0, abs=1e-5)
    exact = sum(math.exp(p[y]) * (p[y] - q[y]) for y in p)
    assert exact > 0.05  # a real difference to estimate
    tok = SimpleNamespace(pad_token_id=2, eos_token_id=2)
    torch.manual_seed(0)
    n = 4000
    responses = sample_responses(policy, tok, [prompt] * n, max_new_tokens=2, batch_size=n)
    counts = {}
    for r in responses:
        counts[tuple(r)] = counts.get(tuple(r), 0) + 1
    assert set(counts) <= set(p)  # every sample is one of the enumerated responses
    tv = 0.5 * sum(abs(counts.get(y, 0) / n - math.exp(p[y])) for y in p)
    assert tv < 0.04  # samples follow pi itself (no top-k / top-p)
    log_ratios = sampled_kl(policy, reference, [prompt] * n, responses, pad_id=2, batch_size=1000)
    mean = sum(log_ratios) / n
    se = math.sqrt(sum((x - mean) ** 2 for x in log_ratios) / (n - 1) / n)
    assert abs(mean - exact) < 4 * se, (mean, exact, se)
    # the RL stage's per-token log-probs sum to the library's sequence log-probs (so its KL is the same one)
    batch = response_batch([prompt] * 50, responses[:50], 2, torch.device("cpu"))
    with torch.no_grad():
        rl_kl = ((token_stats(policy, batch)["logps"] - token_stats(reference, batch)["logps"]) * batch["mask"]).sum(-1)
    assert torch.allclose(rl_kl, torch.tensor(log_ratios[:50]), atol=1e-5)
    pairs = [TokenizedPair(prompt, r, r) for r in responses[:50]]
    assert torch.allclose(
        (token_stats(policy, batch)["logps"] * batch["mask"]).sum(-1),
        sequence_logps(policy, collate_padded(pairs, 2))[0][:50],
        atol=1e-5,
    )


# --- PPO / RLOO math against hand-worked numbers ------------------------------------------------------------------


def test_gae_by_hand():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.5, 7.0, 7.0]])
    values = torch.tensor([[0.1, 0.2, 0.3], [0.4, 9.0, 9.0]])  # row 2: one token, the rest is padding
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    advantages, returns = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    # row 1: delta_2 = 1 - 0.3 = 0.7; delta_1 = 0 + 0.9*0.3 - 0.2 = 0.07; delta_0 = 0 + 0.9*0.2 - 0.1 = 0.08
    a2 = 0.7
    a1 = 0.07 + 0.72 * a2  # gamma * lam = 0.72
    a0 = 0.08 + 0.72 * a1
    # row 2: terminal after its only token: delta_0 = 0.5 - 0.4
    expected = torch.tensor([[a0, a1, a2], [0.1, 0.0, 0.0]])
    assert torch.allclose(advantages, expected, atol=1e-6)
    assert torch.allclose(returns, expected + torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.0, 0.0]]), atol=1e-6)


def test_ppo_clipped_objectives_by_hand():
    old = torch.zeros(1, 4)
    new = torch.log(torch.tensor([[1.5, 0.5, 1.1, 3.0]]))  # ratios
    adv = torch.tensor([[1.0, -1.0, 2.0, 5.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])  # the last token is padding
    loss, clipfrac, approx_kl = ppo_policy_loss(new, old, adv, mask, cliprange=0.2)
    # per token max(-A r, -A clip(r, 0.8, 1.2)): max(-1.5, -1.2) = -1.2 (clipped); max(0.5, 0.8) = 0.8 (clipped);
    # max(-2.2, -2.2) = -2.2 (not clipped)
    assert loss.item() == pytest.approx((-1.2 + 0.8 - 2.2) / 3, abs=1e-6)
    assert clipfrac.item() == pytest.approx(2 / 3)
    assert approx_kl.item() == pytest.approx(0.5 * (math.log(1.5) ** 2 + math.log(0.5) ** 2 + math.log(1.1) ** 2) / 3)
    # gradient flows through the unclipped token only: d/d logp of -2 r / 3 at r = 1.1
    new.requires_grad_(True)
    ppo_policy_loss(new, old, adv, mask, 0.2)[0].sum().backward()
    assert torch.allclose(new.grad, torch.tensor([[0.0, 0.0, -2 * 1.1 / 3, 0.0]]), atol=1e-6)

    values, old_values = torch.tensor([[1.0, 0.0, 2.0]]), torch.tensor([[0.5, 0.0, 2.0]])
    returns = torch.tensor([[2.0, 1.0, 1.0]])
    vloss, vclip = ppo_value_loss(values, old_values, returns, torch.ones(1, 3), cliprange_value=0.2)
    # token 1: V = 1 clipped to 0.7: max((1-2)^2, (0.7-2)^2) = 1.69 (clipped term larger); token 2: 1; token 3: 1
    assert vloss.item() == pytest.approx(0.5 * (1.69 + 1.0 + 1.0) / 3)
    assert vclip.item() == pytest.approx(1 / 3)


def test_rewards_rloo_whitening_and_kl_controller_by_hand():
    scores = torch.tensor([2.0, -1.0])
    logps = torch.tensor([[-1.0, -2.0], [-0.5, 0.0]])
    ref = torch.tensor([[-1.5, -1.0], [-1.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    rewards, kl = kl_penalised_rewards(scores, logps, ref, mask, kl_coef=0.1)
    assert torch.allclose(kl, torch.tensor([[0.5, -1.0], [0.5, 0.0]]))
    assert torch.allclose(rewards, torch.tensor([[-0.05, 0.1 + 2.0], [-0.05 - 1.0, 0.0]]))
    assert torch.allclose(rloo_advantages(torch.tensor([[1.0, 2.0, 6.0]])), torch.tensor([[1 - 4.0, 2 - 3.5, 6 - 1.5]]))
    w = masked_whiten(torch.tensor([[1.0, 3.0], [5.0, 100.0]]), mask)  # mean 3, unbiased std 2, padding ignored
    assert torch.allclose(w, torch.tensor([[-1.0, 0.0], [1.0, 0.0]]), atol=1e-6)
    c = KLController(0.1, target=6.0, horizon=100)
    c.update(9.0, 10)  # error clip(9/6 - 1) = 0.2: beta *= 1 + 0.2 * 10 / 100
    assert c.value == pytest.approx(0.1 * 1.02)
    c.update(5.4, 50)  # error -0.1: beta *= 1 - 0.1 * 0.5
    assert c.value == pytest.approx(0.1 * 1.02 * 0.95)
    fixed = KLController(0.1)
    fixed.update(100.0, 10)
    assert fixed.value == 0.1


# --- rl ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ["ppo", "rloo"])
def test_rl_trains_on_a_memorised_rollout(algorithm, tiny_model_dir, tmp_path):
    """One rollout reused for 4 optimizer steps (ppo_epochs=4): at the first step pi = pi_old exactly
    (ratio 1: no clipping, approx_kl 0), then the surrogate loss on that rollout goes down."""
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p + "\n"} for p, _, _ in REVIEWS[:2]])
    out = tmp_path / "rl"
    cfg = load_config(
        RLConfig,
        None,
        [
            f"model={tiny_model_dir}",
            f"dataset={prompts}",
            f"output_dir={out}",
            "reward=test_pipeline:first_char_reward",
            f"algorithm={algorithm}",
            "per_device_train_batch_size=2",
            "num_samples_per_prompt=4",
            "max_new_tokens=5",
            "ppo_epochs=4",
            "max_steps=4",
            "logging_steps=1",
            "learning_rate=3e-3",
            "progress_bar=false",
            "adaptive_kl=true",
            "max_grad_norm=0",
        ]
        + ([f"eval_dataset={prompts}"] if algorithm == "ppo" else []),
    )
    from dpokit.commands import rl

    rl.rl(cfg)
    rows = train_rows(out)
    keys = ["reward", "kl", "kl_coef", "entropy", "policy_loss", "clipfrac", "approx_kl", "response_length"]
    keys += ["value_loss", "value_clipfrac"] if algorithm == "ppo" else []
    assert all(k in rows[0] for k in keys)
    assert rows[0]["approx_kl"] == 0.0 and rows[0]["clipfrac"] == 0.0 and abs(rows[0]["kl"]) < 1e-5
    assert len({r["reward"] for r in rows}) == 1  # the same rollout throughout
    losses = [r["policy_loss"] for r in rows]
    assert losses[-1] < losses[0] - 0.05 and all(b < a for a, b in zip(losses, losses[1:]))
    if algorithm == "ppo":
        assert rows[-1]["value_loss"] < rows[0]["value_loss"]
    if algorithm == "ppo":
        assert "eval/reward" in eval_rows(out)[0] and "eval/kl" in eval_rows(out)[-1]
    # the final directory is a plain causal LM; the value head stays in checkpoints
    from safetensors.torch import load_file

    assert not [k for k in load_file(out / "model.safetensors") if "value_head" in k]
    if algorithm == "ppo":
        assert "value_head.weight" in load_file(out / "checkpoint-4" / "model.safetensors")
    AutoModelForCausalLM.from_pretrained(out)


def test_rl_rejects_bad_settings(tiny_model_dir, tmp_path, capsys):
    base = ["rl", f"model={tiny_model_dir}", "dataset=x.jsonl", f"output_dir={tmp_path / 'o'}"]
    assert main(base) == 2
    assert "key 'reward' is required" in capsys.readouterr().err
    assert main(base + ["reward=vader", "algorithm=rloo", "num_samples_per_prompt=1"]) == 2
    assert "rloo needs at least 2" in capsys.readouterr().err
    assert main(base + ["reward=vader", "use_lora=true"]) == 2
    assert "not supported by `dpokit rl`" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "command,rows,expected",
    [
        ("sft", [{"messages": [{"role": "user", "content": "hi"}]}], "row 1: field 'messages': no assistant turn"),
        (
            "sft",
            [{"prompt": "p", "completion": "c"}, {"prompt": "p", "completion": ""}],
            "row 2: field 'completion': empty string",
        ),
        ("sft", [{"text": "t"}], "expected columns prompt+completion, messages, or prompt+chosen"),
        ("generate", [{"prompt": "p"}, {"prompt": 3}], "row 2: field 'prompt': expected a string, got int"),
        ("pairs", [{"prompt": "p", "responses": "r"}], "row 1: field 'responses': expected a list of strings"),
    ],
)
def test_pipeline_bad_input_is_one_line(command, rows, expected, tiny_model_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "bad.jsonl", rows)
    args = {
        "sft": [f"model={tiny_model_dir}", f"dataset={data}", f"output_dir={tmp_path / 'o'}"],
        "generate": [f"model={tiny_model_dir}", f"dataset={data}", f"output_file={tmp_path / 'o' / 's.jsonl'}"],
        "pairs": [f"samples={data}", "reward=vader", f"output={tmp_path / 'o'}"],
    }[command]
    assert main([command, *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and expected in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_every_pipeline_command_has_help(capsys):
    for command in ("sft", "rm", "generate", "pairs", "rl"):
        assert main([command, "--help"]) == 0
        assert "keys:" in capsys.readouterr().out
