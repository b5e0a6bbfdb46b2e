"""`dpokit eval`: a trained policy against its reference on held-out data.

- implicit-reward accuracy and margin: beta * log(pi/pi_ref) on held-out preference pairs (the
  reference's implicit reward is 0 for every response, so its accuracy is chance, 0.5, by definition:
  a tie counts half);
- ground-truth reward of samples: one sampled response per held-out prompt from each model at
  `temperature` and `top_p` (top-k off), scored by a reward function (VADER sentiment by default), mean
  with its standard error;
- KL(pi || pi_ref) of the untempered models, over responses of at most max_new_tokens tokens: the mean
  of the sequence log-ratio log pi(y|x) - log pi_ref(y|x) on a separate sample y ~ pi per prompt drawn
  at temperature 1 (top_p 1, top-k off), with its standard error. Not on the reward's samples: those
  come from the tempered pi_T, under which the mean untempered log-ratio is the KL of nothing, off by a
  problem-dependent amount in either direction (at T = 0.7: +41-49% on a tiny model in a review, +42%
  and +21% on the two problems of tests/test_numerics.py). The KL samples are drawn and scored
  in fp32 whatever `precision` is, so that they come from the very distribution whose log-probs are
  scored (the held-out log-probs and the reward's samples use `precision`; under bf16 the output layer
  still runs in fp32, see logprobs.py).
"""

import json
import math
import typing
from dataclasses import dataclass
from pathlib import Path

import torch

from dpokit import models
from dpokit.config import PRECISIONS, in_memory_name, opt, resolve_config
from dpokit.data.batch import collate_padded
from dpokit.data.load import load_pairs, named
from dpokit.data.tokenize import TokenizedPair, explicit_prompt, tokenize_dataset
from dpokit.io import atomic_write_text
from dpokit.logprobs import sequence_logps
from dpokit.losses import preference_accuracy
from dpokit.report import log
from dpokit.rewards import get_reward_fn
from dpokit.sampling import device_of, sample_responses
from dpokit.train.refcache import pair_logps
from dpokit.train.runtime import autocast, set_seed, to_device


@dataclass
class EvalConfig:
    """Held-out evaluation of a trained policy against its reference."""

    model: str = opt(None, "the policy to evaluate (a model directory, hub name, .gguf, or 'default')")
    ref_model: str = opt("default", "the reference pi_ref the policy was trained from")
    dataset: str = opt(None, "held-out preference pairs (file, `datasets` directory or name)")
    dataset_test_split: str = opt("test", "split of `dataset` to use when it has splits")
    max_eval_examples: typing.Optional[int] = opt(None, "use at most this many held-out pairs")
    beta: float = opt(0.1, "beta of the implicit reward beta * log(pi / pi_ref)")
    max_length: typing.Optional[int] = opt(1024, "as in training")
    max_prompt_length: typing.Optional[int] = opt(512, "as in training")
    truncation_mode: str = opt("keep_end", "as in training", ["keep_end", "keep_start"])
    per_device_eval_batch_size: int = opt(16, "examples per batch")
    reward: typing.Optional[str] = opt(
        "vader",
        "ground-truth reward function for samples: a built-in name "
        "('vader') or 'module:function'; empty to skip sampling",
    )
    num_samples: int = opt(64, "held-out prompts to sample one response each for")
    max_new_tokens: int = opt(48, "maximum tokens per sampled response")
    temperature: float = opt(0.7, "sampling temperature")
    top_p: float = opt(1.0, "nucleus sampling threshold")
    output_file: typing.Optional[str] = opt(None, "write the results as JSON here (default: <model>/eval.json)")
    precision: str = opt(
        "auto", "auto (bf16 where the device does it natively, else fp32), fp32, or bf16 autocast", PRECISIONS
    )
    seed: int = opt(0, "seed for sampling")
    trust_remote_code: bool = opt(False, "allow model repositories to run their own code")


def mean_se(xs) -> tuple[float, float]:
    n = len(xs)
    m = sum(xs) / n
    var = sum((x - m) ** 2 for x in xs) / (n - 1) if n > 1 else 0.0
    return m, math.sqrt(var / n)


def implicit_reward_metrics(beta, policy_logps, reference_logps) -> dict:
    chosen_rewards = beta * (policy_logps[0] - reference_logps[0])
    rejected_rewards = beta * (policy_logps[1] - reference_logps[1])
    margins = chosen_rewards - rejected_rewards
    acc = preference_accuracy(margins).mean().item()
    return {"implicit_reward_accuracy": acc, "implicit_reward_margin": margins.mean().item()}


@torch.no_grad()
def sample(model, tokenizer, prompts: list, max_new_tokens, temperature, top_p, seed, batch_size=32):
    """One response per prompt (token-id lists), seeded -> (texts, ids)."""
    set_seed(seed)
    ids = sample_responses(model, tokenizer, prompts, max_new_tokens, temperature, top_p, batch_size=batch_size)
    return [tokenizer.decode(row, skip_special_tokens=True).strip() for row in ids], ids


KL_ESTIMATOR = (
    "KL(pi || pi_ref) of the untempered models over responses of at most max_new_tokens tokens: "
    "the mean of log pi(y|x) - log pi_ref(y|x) over one sample y ~ pi per prompt, drawn at "
    "temperature 1, top_p 1, top-k off (not the reward's samples), drawn and scored in fp32"
)


@torch.no_grad()
def kl_samples(
    policy, reference, tokenizer, prompts: list, max_new_tokens: int, seed: int, batch_size: int = 32
) -> list:
    """Per-sample log pi(y|x) - log pi_ref(y|x), y ~ pi(.|x) at temperature 1 with top_p 1 and top-k off,
    one per prompt: their mean is an unbiased estimate of KL(pi || pi_ref) between the untempered
    models' distributions over responses of at most max_new_tokens tokens (a response cut there stands
    for the event "these first tokens", whose probability is what its log-prob sums). Autocast is off
    for the sampling and the scoring alike: both see the same fp32 distribution."""
    with torch.autocast(device_of(policy).type, enabled=False):
        set_seed(seed)
        ids = sample_responses(
            policy, tokenizer, prompts, max_new_tokens, temperature=1.0, top_p=1.0, top_k=0, batch_size=batch_size
        )
        return sampled_kl(policy, reference, prompts, ids, tokenizer.pad_token_id)


@torch.no_grad()
def sampled_kl(policy, reference, prompts, responses, pad_id, batch_size=16):
    """Per-sample log pi(y|x) - log pi_ref(y|x) for given responses: for y ~ pi (untempered: see
    kl_samples) its mean estimates KL(pi || pi_ref)."""
    pairs = [TokenizedPair(p, r, r) for p, r in zip(prompts, responses) if r]
    out = []
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i : i + batch_size]
        batch = to_device(collate_padded(chunk, pad_id), policy.device)
        lp = sequence_logps(policy, batch)[0][: len(chunk)]
        lr = sequence_logps(reference, batch)[0][: len(chunk)]
        out += (lp - lr).tolist()
    return out


def evaluate(config=None, *, model=None, ref_model=None, tokenizer=None, dataset=None) -> dict:
    """`dpokit eval`: config is an EvalConfig, a dict of its keys or a YAML path; model / ref_model /
    tokenizer / dataset (a `datasets` object, a list of rows or a path) may be given in place of their
    keys. Returns the results (also written as JSON and printed as a table)."""
    cfg = resolve_config(
        EvalConfig,
        config,
        model=in_memory_name(model),
        ref_model=in_memory_name(ref_model),
        dataset=in_memory_name(dataset, "dataset"),
    )
    tokenizer = tokenizer or models.load_tokenizer(cfg.model, cfg.trust_remote_code)
    source = cfg.dataset if dataset is None else named(dataset, "dataset")
    rows, label, _ = load_pairs(source, cfg.dataset_test_split)
    examples, stats = tokenize_dataset(
        tokenizer, rows, label, cfg.max_length, cfg.max_prompt_length, cfg.truncation_mode
    )
    examples = examples[: cfg.max_eval_examples] if cfg.max_eval_examples else examples
    log.info("%s: %s", label, stats.summary())
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    policy = (model if model is not None else models.load_model(cfg.model, cfg.trust_remote_code)).eval().to(device)
    reference = ref_model if ref_model is not None else models.load_model(cfg.ref_model, cfg.trust_remote_code)
    reference = reference.eval().to(device)
    pad = tokenizer.pad_token_id
    bs = cfg.per_device_eval_batch_size
    ref_logps = pair_logps(reference, examples, pad, bs, device, cfg.precision)
    pol_logps = pair_logps(policy, examples, pad, bs, device, cfg.precision)
    results = {
        "dataset": label,
        "pairs": len(examples),
        "beta": cfg.beta,
        "reference": {"model": cfg.ref_model, **implicit_reward_metrics(cfg.beta, ref_logps, ref_logps)},
        "policy": {"model": cfg.model, **implicit_reward_metrics(cfg.beta, pol_logps, ref_logps)},
    }
    if cfg.reward:
        reward_fn = get_reward_fn(cfg.reward)
        # the rows' own prompts (strings or messages), as a reward model expects them, one per distinct prompt
        original = {row: explicit_prompt(ex)["prompt"] for row, ex in rows}
        unique = {tuple(e.prompt_ids): e for e in examples}
        prompts = [e.prompt_ids for e in unique.values()][: cfg.num_samples]
        prompt_texts = [original[e.row] for e in unique.values()][: cfg.num_samples]
        sampled_rewards = {}
        for name, model in (("reference", reference), ("policy", policy)):
            with autocast(device, cfg.precision):
                texts, _ = sample(model, tokenizer, prompts, cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.seed)
            rewards = sampled_rewards[name] = reward_fn(prompt_texts, texts)
            m, se = mean_se(rewards)
            results[name].update(
                {
                    "reward": m,
                    "reward_se": se,
                    "samples": [
                        {"prompt": p, "response": t, "reward": r}
                        for p, t, r in list(zip(prompt_texts, texts, rewards))[:8]
                    ],
                }
            )
        # the reference's KL to itself is 0 exactly; the policy's on its own samples at temperature 1
        kl, kl_se = mean_se(kl_samples(policy, reference, tokenizer, prompts, cfg.max_new_tokens, cfg.seed))
        results["reference"].update(kl=0.0, kl_se=0.0)
        results["policy"].update(kl=kl, kl_se=kl_se)
        results["kl_estimator"] = KL_ESTIMATOR
        results["policy"]["win_rate"], results["policy"]["win_rate_se"] = win_rate(
            sampled_rewards["policy"], sampled_rewards["reference"]
        )
        results["reward_fn"] = cfg.reward
        results["num_samples"] = len(prompts)
        results["temperature"], results["top_p"] = cfg.temperature, cfg.top_p
    out = Path(cfg.output_file) if cfg.output_file else Path(cfg.model) / "eval.json"
    if out.parent.is_dir():
        atomic_write_text(out, json.dumps(results, indent=2))
    print(table(results))
    print(f"results written to {out}" if out.parent.is_dir() else "")
    return results


def table(results) -> str:
    cols = [
        ("implicit_reward_accuracy", "implicit-reward acc", "{:.3f}"),
        ("implicit_reward_margin", "margin", "{:+.3f}"),
    ]
    if "reward_fn" in results:
        cols += [("reward", f"{results['reward_fn']} reward", "{:+.3f}"), ("kl", "KL(pi||ref)", "{:.2f}")]
    head = f"{'':<10}" + "".join(f"{c[1]:>22}" for c in cols)
    lines = [
        f"held-out: {results['dataset']}, {results['pairs']} pairs"
        + (f", {results['num_samples']} sampled prompts" if "num_samples" in results else ""),
        head,
    ]
    for name in ("reference", "policy"):
        r = results[name]
        cells = []
        for key, _, f in cols:
            v = f.format(r[key])
            if key + "_se" in r:
                v += f" ± {r[key + '_se']:.3f}"
            cells.append(f"{v:>22}")
        lines.append(f"{name:<10}" + "".join(cells))
    if "reward_fn" in results:
        lines.append(
            f"(reward: samples at temperature {results.get('temperature', '?')}, top_p "
            f"{results.get('top_p', '?')}; KL: the untempered models' KL(pi||ref), on separate "
            f"samples at temperature 1)"
        )
    return "\n".join(lines)


def win_rate(rewards, baseline_rewards) -> tuple[float, float]:
    """How often a response beats the baseline's response to the same prompt under the reward (a tie counts
    half), with its standard error: the DPO paper's win rate against a baseline, judged by a reward
    function (or `rm:PATH`) instead of GPT-4 or people."""
    outcomes = [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(rewards, baseline_rewards)]
    return mean_se(outcomes)
