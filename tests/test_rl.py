"""`dpokit rl` learns: PPO and RLOO solve a toy reward from fresh rollouts (a new sample every step), on a
tiny model; and the RL pieces against independent computations (the prefix-shared rollout layout
against the padded one, per-module learning rates, token-mean aggregation, explained variance).

The toy: reward 1 when the response's first token is one of a set of tokens, chosen once from the
reference's own first tokens so that they start with ~30% of its probability. The reward is a function of
text (as every reward is), so "first token in the set" is read as "the text starts with one of the set's
decoded strings". Solving it means moving the first token's mass onto the set, which the leave-one-out
baseline (RLOO) or the critic (PPO) must credit from 16 samples a step."""

import json

import pytest
import torch
from conftest import REVIEWS, write_jsonl
from test_layouts import peaked_llama

from dpokit.commands.rl import RLConfig, rl
from dpokit.config import load_config
from dpokit.rl_losses import explained_variance, per_response, ppo_policy_loss
from dpokit.sampling import sample_responses
from dpokit.train.optim import build_optimizer
from dpokit.train.rl_step import PromptExample, RLStep, collate_prompts, response_batch, token_stats

TARGET_STRINGS: list = []  # set by the `toy` fixture; read by first_token_reward


def first_token_reward(prompts, responses):
    """1.0 when the response starts with one of TARGET_STRINGS (`test_rl:first_token_reward`)."""
    return [float(any(r.startswith(s) for s in TARGET_STRINGS)) for r in responses]


@pytest.fixture(scope="module")
def toy(tmp_path_factory, smol_tokenizer):
    """(model directory, prompts file, the reference's success rate): a peaked tiny Llama (next-token
    distributions shaped like a trained model's) and the target set of first tokens."""
    from dpokit.data.prompts import tokenize_prompt

    d = tmp_path_factory.mktemp("toy")
    model = peaked_llama(len(smol_tokenizer), head_std=1.0, seed=3)
    model.config.bos_token_id, model.config.eos_token_id = smol_tokenizer.bos_token_id, smol_tokenizer.eos_token_id
    model.config.pad_token_id = smol_tokenizer.pad_token_id
    model.save_pretrained(d / "model", safe_serialization=True)
    smol_tokenizer.save_pretrained(d / "model")
    prompts = [p + "\n" for p, _, _ in REVIEWS]
    write_jsonl(d / "prompts.jsonl", [{"prompt": p} for p in prompts])
    ids = [tokenize_prompt(smol_tokenizer, p, "toy", i) for i, p in enumerate(prompts)]
    # the reference's first tokens: probability of each, summed over the prompts
    with torch.no_grad():
        probs = torch.stack([model(torch.tensor([p])).logits[0, -1].softmax(-1) for p in ids]).mean(0)
    chosen, mass = [], 0.0
    for t in probs.argsort(descending=True).tolist()[1::2]:  # every other likely token: the rest is the alternative
        text = smol_tokenizer.decode([t], skip_special_tokens=True)
        if text.strip() and "\ufffd" not in text and not any(text.startswith(s) or s.startswith(text) for s in chosen):
            chosen.append(text)
            mass += float(probs[t])
        if mass > 0.3:
            break
    TARGET_STRINGS[:] = chosen
    return d / "model", d / "prompts.jsonl", mass


def train_rows(out):
    rows = [json.loads(line) for line in open(out / "metrics.jsonl", encoding="utf-8") if line.strip()]
    return [r for r in rows if "reward" in r and "step" in r]


@pytest.mark.parametrize(
    "algorithm,extra",
    [("rloo", {"adaptive_kl": True, "target_kl": 1.0}), ("ppo", {"value_lr": 1e-2})],
)
def test_rl_solves_a_toy_reward_from_fresh_rollouts(algorithm, extra, toy, tmp_path):
    """Every step samples new responses (ppo_epochs 1): the reward goes from the reference's ~0.3 to ~1
    within 12 steps of 4 prompts x 4 samples."""
    model_dir, prompts, mass = toy
    assert 0.25 < mass < 0.4
    out = tmp_path / algorithm
    cfg = {
        "model": str(model_dir),
        "dataset": str(prompts),
        "output_dir": str(out),
        "reward": "test_rl:first_token_reward",
        "algorithm": algorithm,
        "per_device_train_batch_size": 4,
        "num_samples_per_prompt": 4,
        "max_new_tokens": 2,
        "ppo_epochs": 1,
        "max_steps": 12,
        "logging_steps": 1,
        "learning_rate": 1e-3,
        "lr_scheduler": "constant",
        "kl_coef": 0.01,
        "progress_bar": False,
        **extra,
    }
    rl(cfg)
    rewards = [r["reward"] for r in train_rows(out)]
    assert len(rewards) == 12
    assert rewards[0] < 0.5, rewards  # the reference's own rate (16 samples of a ~0.3 chance)
    assert sum(rewards[-3:]) / 3 > 0.9, rewards
    rows = train_rows(out)
    for key in ("finished", "reward_se", "advantage_mean", "advantage_std"):
        assert key in rows[0]
    if algorithm == "ppo":
        assert "value_explained_variance" in rows[0]
    if extra.get("adaptive_kl"):  # the controller followed each step's rollout KL (16 samples, horizon 1000)
        beta = 0.01
        for row in rows:
            assert row["kl_coef"] == pytest.approx(beta, rel=1e-6)
            beta *= 1 + min(max(row["kl"] / 1.0 - 1, -0.2), 0.2) * 16 / 1000
        assert rows[-1]["kl_coef"] != 0.01


def test_critic_warmup_leaves_the_policy_unchanged(toy, tmp_path):
    """PPO's first critic_warmup_steps train the value head alone: the policy's weights stay pi_ref's."""
    from safetensors.torch import load_file

    model_dir, prompts, _ = toy
    out = tmp_path / "warm"
    rl(
        {
            "model": str(model_dir),
            "dataset": str(prompts),
            "output_dir": str(out),
            "reward": "test_rl:first_token_reward",
            "algorithm": "ppo",
            "per_device_train_batch_size": 4,
            "num_samples_per_prompt": 2,
            "max_new_tokens": 2,
            "ppo_epochs": 1,
            "max_steps": 2,
            "critic_warmup_steps": 2,
            "learning_rate": 1e-2,
            "value_lr": 1e-2,
            "progress_bar": False,
        }
    )
    before, after = load_file(model_dir / "model.safetensors"), load_file(out / "checkpoint-2" / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert after["value_head.weight"].abs().sum() > 0  # the head did learn (it starts at zero)


def test_prefix_shared_rollout_matches_padded(smol_tokenizer):
    """The rollout layout [prompt | y_1 | ... | y_k] gives the padded layout's log-probs, entropies and
    values (prompts and responses of uneven lengths, k = 3) to 1e-4 in fp32."""
    model = peaked_llama(len(smol_tokenizer), seed=1)
    model.value_head = torch.nn.Linear(model.config.hidden_size, 1)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(5, 1000, (n,), generator=g).tolist() for n in (3, 9, 6)]
    torch.manual_seed(0)
    responses = sample_responses(model, smol_tokenizer, [p for p in prompts for _ in range(3)], 12)
    responses = [r[: 1 + i % 12] for i, r in enumerate(responses)]  # uneven lengths
    cpu = torch.device("cpu")
    padded = response_batch(prompts, responses, smol_tokenizer.pad_token_id, cpu, k=3)
    shared = response_batch(prompts, responses, smol_tokenizer.pad_token_id, cpu, k=3, shared=True)
    assert shared["input_ids"].shape[0] == 3 and padded["input_ids"].shape[0] == 9
    with torch.no_grad():
        a = token_stats(model, padded, 0.8, value_head=True)
        b = token_stats(model, shared, 0.8, value_head=True)
    mask = padded["mask"].bool()
    assert torch.equal(padded["mask"], shared["mask"])
    for key in ("logps", "entropy", "values"):
        assert torch.allclose(a[key][mask], b[key][mask], atol=1e-4), key


@pytest.mark.parametrize("algorithm", ["rloo", "ppo"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_fresh_rollout_reuses_the_training_forward_bit_for_bit(algorithm, precision, smol_tokenizer):
    """With ppo_epochs 1 a step scores its rollout with the training forward itself (grad on) instead of a
    separate no-grad forward: the rollout (old log-probs, values, KL-penalised advantages) is identical bit
    for bit to the separate forward's, in fp32 and under bf16 autocast, and the ratio is exactly 1."""
    import copy

    model = peaked_llama(len(smol_tokenizer), seed=4)
    model.value_head = torch.nn.Linear(model.config.hidden_size, 1)
    with torch.no_grad():
        model.value_head.weight.normal_(0, 0.1)
    reference = copy.deepcopy(model).eval()
    del reference.value_head
    model.train()
    cfg = load_config(
        RLConfig,
        None,
        values={
            "model": "x",
            "dataset": "x",
            "reward": "vader",
            "algorithm": algorithm,
            "ppo_epochs": 1,
            "max_new_tokens": 6,
        },
        source="test",
    )
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(5, 1000, (n,), generator=g).tolist() for n in (4, 7)]
    batch = collate_prompts([PromptExample(f"p{i}", p, i) for i, p in enumerate(prompts)])
    reward = lambda prompts, responses: [float(len(r) % 3) for r in responses]  # noqa: E731
    on = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    fused, separate = RLStep(cfg, reference, reward, smol_tokenizer), RLStep(cfg, reference, reward, smol_tokenizer)
    with on:
        torch.manual_seed(0)
        loss, metrics = fused(model, batch)
        torch.manual_seed(0)
        r = separate.rollout(model, batch)
    got = fused.rollouts[0]
    assert set(got) == set(r)
    for key in r:
        assert torch.equal(got[key], r[key]), key
    assert loss.requires_grad and float(metrics["approx_kl"].abs().max()) == 0.0
    assert float(r["advantages"].abs().sum()) > 0  # a real rollout, not all ties


def test_value_head_has_its_own_learning_rate_and_adam_keys(tiny_model_dir):
    cfg = load_config(
        RLConfig,
        None,
        ["dataset=x", "reward=vader", "algorithm=ppo", "learning_rate=1e-5", "value_lr=3e-3", "adam_beta2=0.95"]
        + ["adam_epsilon=1e-6"],
    )
    model = torch.nn.Module()
    model.body = torch.nn.Linear(3, 3)
    model.value_head = torch.nn.Linear(3, 1)
    opt = build_optimizer(cfg, model)
    lrs = [(g["lr"], len(g["params"])) for g in opt.param_groups]
    assert lrs == [(1e-5, 2), (3e-3, 2)]
    assert opt.param_groups[1]["params"][0] is model.value_head.weight
    assert opt.defaults["betas"] == (0.9, 0.95) and opt.defaults["eps"] == 1e-6
    # rloo has no value head: one group
    cfg_rloo = load_config(RLConfig, None, ["dataset=x", "reward=vader"])
    assert cfg_rloo.algorithm == "rloo" and len(build_optimizer(cfg_rloo, model).param_groups) == 1


def test_token_mean_aggregation_and_explained_variance_by_hand():
    x = torch.tensor([[1.0, 2.0, 3.0], [10.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    # sequence mean: (2 + 10) / 2 = 6 per response on average; token mean: (1 + 2 + 3 + 10) / 4 = 4
    assert per_response(x, mask).mean().item() == pytest.approx(6.0)
    assert per_response(x, mask, "token_mean").mean().item() == pytest.approx(4.0)
    loss, _, _ = ppo_policy_loss(torch.zeros(2, 3), torch.zeros(2, 3), -x, mask, 0.2, "token_mean")
    assert loss.mean().item() == pytest.approx(4.0)  # ratio 1: the loss is -A per token
    values = torch.tensor([[0.5, 1.5, 3.5], [9.0, 7.0, 7.0]])
    returns = torch.tensor([[1.0, 2.0, 3.0], [10.0, 0.0, 0.0]])
    r, e = [1.0, 2.0, 3.0, 10.0], [0.5, 0.5, -0.5, 1.0]
    var = lambda v: sum((a - sum(v) / len(v)) ** 2 for a in v) / len(v)
    assert explained_variance(values, returns, mask) == pytest.approx(1 - var(e) / var(r))


@pytest.mark.parametrize(
    "override,expected",
    [
        ("adam_beta2=1.0", "key 'adam_beta2': must be in [0, 1), got 1.0"),
        ("adam_epsilon=0", "key 'adam_epsilon': must be positive"),
        ("value_lr=-1", "keys 'value_lr' and 'critic_warmup_steps': must be non-negative"),
        ("loss_aggregation=tokens", "key 'loss_aggregation': 'tokens' is not one of sequence_mean, token_mean"),
    ],
)
def test_rl_optimizer_keys_refuse_bad_values_in_one_line(override, expected, tmp_path, capsys):
    from conftest import one_error_line

    from dpokit.cli import main

    assert main(["rl", "dataset=x.jsonl", "reward=vader", f"output_dir={tmp_path / 'o'}", override]) == 2
    one_error_line(capsys.readouterr().err, expected)
    assert not (tmp_path / "o").exists()
