"""`dpokit eval`: a trained policy against its reference on held-out prompts (and pairs).

- implicit-reward accuracy and margin (when `dataset` holds preference pairs): beta * log(pi/pi_ref) on
  held-out pairs (the reference's implicit reward is 0 for every response, so its accuracy is chance,
  0.5, by definition: a tie counts half);
- ground-truth reward of samples: one sampled response per held-out prompt (`prompts`, or the distinct
  prompts of `dataset`, the first `num_samples` of them) from each model at `temperature` and `top_p`
  (top-k off), scored by a reward function (VADER sentiment by default): mean with its standard error,
  the paired difference policy - reference over the same prompts with its paired standard error, the
  win rate, and the fraction of responses that ended with EOS (`finished`);
- KL(pi || pi_ref) of the untempered models, over responses of at most max_new_tokens tokens: the mean
  of the sequence log-ratio log pi(y|x) - log pi_ref(y|x) over samples y ~ pi at temperature 1 (top_p 1,
  top-k off), with its standard error. The policy's log-probs come from the logits that sampled the
  responses, so the KL costs one forward of the reference only. At temperature 1 (and top_p 1) these are
  the reward's own samples; otherwise a separate sample per prompt is
  drawn at temperature 1, since the untempered log-ratio's mean under the tempered pi_T is the KL of
  nothing (at T = 0.7: +41-49% on a tiny model in a review, +42% and +21% on the two problems of
  tests/test_numerics.py). Samples scored for the KL are drawn and scored in fp32 whatever `precision`
  is, so that they come from the very distribution whose log-probs are scored.

For sweeps: the reference's side (its samples, rewards and stats at these sampler settings, plus
`reference_samples_per_prompt` further samples per prompt for the oracle and best-of-n curves of
`dpokit frontier`) is computed once and cached in `reference_cache`, keyed by a fingerprint of the
reference's weights, the prompts' token ids, the sampler settings, the seed and the reward. The JSON
keeps the per-prompt rewards and KLs (`per_prompt`), so that `dpokit frontier` can bootstrap over prompts.
"""

import hashlib
import json
import time
import typing
from dataclasses import dataclass
from pathlib import Path

import torch

from dpokit import models
from dpokit.config import PRECISIONS, in_memory_name, opt, resolve_config
from dpokit.data.load import load_pairs, named
from dpokit.data.prompts import load_prompts, tokenize_prompt, truncate_prompt
from dpokit.data.tokenize import tokenize_dataset
from dpokit.errors import UserError
from dpokit.estimators import mean_se, paired_difference
from dpokit.io import atomic_write_text
from dpokit.losses import preference_accuracy
from dpokit.report import log
from dpokit.rewards import get_reward_fn
from dpokit.sampling import device_of, sample_responses
from dpokit.train.refcache import pair_logps
from dpokit.train.rl_step import response_batch, token_stats
from dpokit.train.runtime import autocast, set_seed


@dataclass
class EvalConfig:
    """Held-out evaluation of a trained policy against its reference."""

    model: str = opt(None, "the policy to evaluate (a model directory, hub name, .gguf, or 'default')")
    ref_model: str = opt("default", "the reference pi_ref the policy was trained from")
    dataset: typing.Optional[str] = opt(
        None, "held-out preference pairs (file, `datasets` directory or name): implicit-reward metrics, and the prompts"
    )
    prompts: typing.Optional[str] = opt(
        None,
        "held-out prompts to sample (rows with `prompt`, `messages`, or preference rows); default: the "
        "distinct prompts of `dataset`",
    )
    dataset_test_split: str = opt("test", "split of `dataset` / `prompts` to use when it has splits")
    max_eval_examples: typing.Optional[int] = opt(None, "use at most this many held-out pairs (not prompts)")
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
    num_samples: int = opt(64, "held-out prompts to sample one response each for (the first of `prompts`)")
    max_new_tokens: int = opt(48, "maximum tokens per sampled response")
    temperature: float = opt(
        0.7,
        "sampling temperature of the rewarded samples; at 1 (with top_p 1) the KL is measured on the same "
        "samples, otherwise on a separate sample at temperature 1",
    )
    top_p: float = opt(1.0, "nucleus sampling threshold")
    reference_cache: typing.Optional[str] = opt(
        None,
        "a directory caching the reference's samples, rewards and stats (keyed by a fingerprint of its "
        "weights, the prompts, the sampler settings, seed and reward): a sweep computes them once",
    )
    reference_samples_per_prompt: int = opt(
        0,
        "further reference samples per prompt, kept as rewards for `dpokit frontier`'s oracle "
        "(pi_ref exp(r/beta)/Z) and best-of-n curves (0: none)",
    )
    output_file: typing.Optional[str] = opt(None, "write the results as JSON here (default: <model>/eval.json)")
    precision: str = opt(
        "auto", "auto (bf16 where the device does it natively, else fp32), fp32, or bf16 autocast", PRECISIONS
    )
    seed: int = opt(0, "seed for sampling")
    trust_remote_code: bool = opt(False, "allow model repositories to run their own code")

    def check(self):
        if self.reference_samples_per_prompt < 0:
            raise UserError("key 'reference_samples_per_prompt': must be non-negative")
        if self.reference_samples_per_prompt == 1:
            raise UserError("key 'reference_samples_per_prompt': 0, or at least 2 (best-of-n needs n >= 2)")


def implicit_reward_metrics(beta, policy_logps, reference_logps) -> dict:
    chosen_rewards = beta * (policy_logps[0] - reference_logps[0])
    rejected_rewards = beta * (policy_logps[1] - reference_logps[1])
    margins = chosen_rewards - rejected_rewards
    acc = preference_accuracy(margins).mean().item()
    return {"implicit_reward_accuracy": acc, "implicit_reward_margin": margins.mean().item()}


@torch.no_grad()
def sample(model, tokenizer, prompts: list, max_new_tokens, temperature, top_p, seed, batch_size=32, logps=False):
    """One response per prompt (token-id lists), seeded -> (texts, ids), or with logps (texts, ids, each
    response's log pi(y|x) from the logits that sampled it)."""
    set_seed(seed)
    ids = sample_responses(
        model, tokenizer, prompts, max_new_tokens, temperature, top_p, batch_size=batch_size, return_logps=logps
    )
    ids, lps = ids if logps else (ids, None)
    texts = [tokenizer.decode(row, skip_special_tokens=True).strip() for row in ids]
    return (texts, ids, lps) if logps else (texts, ids)


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
        ids, logps = sample_responses(
            policy,
            tokenizer,
            prompts,
            max_new_tokens,
            temperature=1.0,
            top_p=1.0,
            top_k=0,
            batch_size=batch_size,
            return_logps=True,
        )
        return sampled_kl(policy, reference, prompts, ids, tokenizer.pad_token_id, policy_logps=logps)


KL_SAME_SAMPLES = (
    "KL(pi || pi_ref) over responses of at most max_new_tokens tokens: the mean of log pi(y|x) - "
    "log pi_ref(y|x) over the reward's own samples y ~ pi (temperature 1, top_p 1, top-k off), drawn and "
    "scored in fp32"
)


@torch.no_grad()
def per_sample_kl(policy, reference, prompts, responses, pad_id, batch_size=16, policy_logps=None) -> list:
    """log pi(y|x) - log pi_ref(y|x) per response, 0.0 for an empty one (no tokens: both log-probs are 0)."""
    kls = iter(sampled_kl(policy, reference, prompts, responses, pad_id, batch_size, policy_logps))
    return [next(kls) if r else 0.0 for r in responses]


@torch.no_grad()
def sampled_kl(policy, reference, prompts, responses, pad_id, batch_size=16, policy_logps=None) -> list:
    """Per non-empty response, log pi(y|x) - log pi_ref(y|x): for y ~ pi (untempered: see kl_samples) its
    mean estimates KL(pi || pi_ref). policy_logps: the policy's log-probs of all the responses, already
    known (from the sampling: sample_responses' return_logps), so only the reference runs a forward."""
    keep = [i for i, r in enumerate(responses) if r]
    prompts, responses = [prompts[i] for i in keep], [responses[i] for i in keep]
    ref = response_logps(reference, prompts, responses, pad_id, batch_size)
    if policy_logps is None:
        pol = response_logps(policy, prompts, responses, pad_id, batch_size)
    else:
        pol = [policy_logps[i] for i in keep]
    return [a - b for a, b in zip(pol, ref)]


@torch.no_grad()
def response_logps(model, prompts, responses, pad_id, batch_size=16) -> list:
    """log pi(y|x) of each (non-empty) response, one forward row per response. (Not sequence_logps: its
    batches are pairs, and a response given as both sides of a pair is computed twice.)"""
    out = []
    for i in range(0, len(responses), batch_size):
        batch = response_batch(prompts[i : i + batch_size], responses[i : i + batch_size], pad_id, device_of(model))
        out += (token_stats(model, batch)["logps"] * batch["mask"]).sum(-1).tolist()
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
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    policy = (model if model is not None else models.load_model(cfg.model, cfg.trust_remote_code)).eval().to(device)
    reference = ref_model if ref_model is not None else models.load_model(cfg.ref_model, cfg.trust_remote_code)
    reference = reference.eval().to(device)
    results = {"beta": cfg.beta}
    results["reference"], results["policy"] = {"model": cfg.ref_model}, {"model": cfg.model}
    source = cfg.dataset if dataset is None else named(dataset, "dataset")
    if source is not None:
        rows, label, _ = load_pairs(source, cfg.dataset_test_split)
        examples, stats = tokenize_dataset(
            tokenizer, rows, label, cfg.max_length, cfg.max_prompt_length, cfg.truncation_mode
        )
        examples = examples[: cfg.max_eval_examples] if cfg.max_eval_examples else examples
        log.info("%s: %s", label, stats.summary())
        pad, bs = tokenizer.pad_token_id, cfg.per_device_eval_batch_size
        ref_logps = pair_logps(reference, examples, pad, bs, device, cfg.precision)
        pol_logps = pair_logps(policy, examples, pad, bs, device, cfg.precision)
        results.update(dataset=label, pairs=len(examples))
        results["reference"].update(implicit_reward_metrics(cfg.beta, ref_logps, ref_logps))
        results["policy"].update(implicit_reward_metrics(cfg.beta, pol_logps, ref_logps))
    if cfg.reward:
        sampled = sampled_metrics(cfg, policy, reference, tokenizer, source, device)
        for side in ("reference", "policy"):  # beside the pair metrics of each side
            results[side].update(sampled.pop(side))
        results.update(sampled)
    out = Path(cfg.output_file) if cfg.output_file else Path(cfg.model) / "eval.json"
    if out.parent.is_dir():
        atomic_write_text(out, json.dumps(results, indent=2))
    print(table(results))
    print(f"results written to {out}" if out.parent.is_dir() else "")
    return results


def held_out_prompts(cfg, tokenizer, source) -> tuple[list, list]:
    """The first num_samples distinct prompts of `prompts` (or of the pairs) -> (as in the data, token ids)."""
    prompts, label = load_prompts(cfg.prompts or source, cfg.dataset_test_split)
    prompts = prompts[: cfg.num_samples]
    ids = [
        truncate_prompt(tokenize_prompt(tokenizer, p, label, row), cfg.max_prompt_length, cfg.truncation_mode)
        for row, p in prompts
    ]
    return [p for _, p in prompts], ids


def sampled_metrics(cfg, policy, reference, tokenizer, source, device) -> dict:
    """Reward, KL, paired difference, win rate, finished: the policy's side sampled here, the reference's
    from its cache (or sampled and cached)."""
    reward_fn = get_reward_fn(cfg.reward)
    prompt_texts, prompts = held_out_prompts(cfg, tokenizer, source)
    ref = reference_side(cfg, reference, tokenizer, prompts, prompt_texts, reward_fn, device)
    same_samples = cfg.temperature == 1.0 and cfg.top_p == 1.0
    t0 = time.perf_counter()
    if same_samples:  # the reward's samples are pi's own: the KL from their logits and one reference forward
        with torch.autocast(device.type, enabled=False):
            texts, ids, logps = sample(policy, tokenizer, prompts, cfg.max_new_tokens, 1.0, 1.0, cfg.seed, logps=True)
            t1 = time.perf_counter()
            kls = per_sample_kl(policy, reference, prompts, ids, tokenizer.pad_token_id, policy_logps=logps)
    else:
        with autocast(device, cfg.precision):
            texts, ids = sample(policy, tokenizer, prompts, cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.seed)
        t1 = time.perf_counter()
        kls = kl_samples(policy, reference, tokenizer, prompts, cfg.max_new_tokens, cfg.seed)
    t2 = time.perf_counter()
    rewards = [float(r) for r in reward_fn(prompt_texts, texts)]
    log.info(
        "policy: %d samples in %.1f s, KL in %.1f s, rewards in %.1f s",
        len(ids),
        t1 - t0,
        t2 - t1,
        time.perf_counter() - t2,
    )
    finished = [float(bool(r) and r[-1] == tokenizer.eos_token_id) for r in ids]
    policy_side = side_stats(rewards, finished, prompt_texts, texts)
    kl, kl_se = mean_se(kls)
    diff, diff_se = paired_difference(rewards, ref["per_prompt"]["reward"])
    win, win_se = win_rate(rewards, ref["per_prompt"]["reward"])
    policy_side.update(
        kl=kl,
        kl_se=kl_se,
        reward_diff=diff,
        reward_diff_se=diff_se,
        win_rate=win,
        win_rate_se=win_se,
        per_prompt={"reward": _round(rewards), "kl": _round(kls)},
    )
    ref_side = {k: v for k, v in ref.items() if k != "fingerprint"}
    return {
        "reference": {"model": cfg.ref_model, **ref_side, "kl": 0.0, "kl_se": 0.0},
        "policy": {"model": cfg.model, **policy_side},
        "kl_estimator": KL_ESTIMATOR if not same_samples else KL_SAME_SAMPLES,
        "reward_fn": cfg.reward,
        "num_samples": len(prompts),
        "prompts_fingerprint": hashlib.sha256(repr(prompts).encode()).hexdigest()[:16],
        "reference_fingerprint": ref["fingerprint"],
        "temperature": cfg.temperature,
        "top_p": cfg.top_p,
        "max_new_tokens": cfg.max_new_tokens,
        "seed": cfg.seed,
    }


def side_stats(rewards, finished, prompt_texts, texts) -> dict:
    m, se = mean_se(rewards)
    return {
        "reward": m,
        "reward_se": se,
        "finished": sum(finished) / len(finished),
        "samples": [
            {"prompt": p, "response": t, "reward": r} for p, t, r in list(zip(prompt_texts, texts, rewards))[:8]
        ],
    }


def _round(xs, digits=5) -> list:
    return [round(float(x), digits) for x in xs]


def reference_side(cfg, reference, tokenizer, prompts, prompt_texts, reward_fn, device) -> dict:
    """The reference's samples (one per prompt, drawn exactly as the policy's are) and their stats, plus
    reference_samples_per_prompt more per prompt as rewards only; read from / written to reference_cache."""
    key = reference_fingerprint(cfg, reference, prompts, device)
    path = Path(cfg.reference_cache) / f"reference-{key}.json" if cfg.reference_cache else None
    if path is not None and path.is_file():
        log.info("reference samples and rewards from %s", path)
        return json.loads(path.read_text(encoding="utf-8"))
    if cfg.temperature == 1.0 and cfg.top_p == 1.0:
        with torch.autocast(device.type, enabled=False):
            texts, ids = sample(reference, tokenizer, prompts, cfg.max_new_tokens, 1.0, 1.0, cfg.seed)
    else:
        with autocast(device, cfg.precision):
            texts, ids = sample(reference, tokenizer, prompts, cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.seed)
    rewards = [float(r) for r in reward_fn(prompt_texts, texts)]
    finished = [float(bool(r) and r[-1] == tokenizer.eos_token_id) for r in ids]
    out = {"fingerprint": key, **side_stats(rewards, finished, prompt_texts, texts)}
    out["per_prompt"] = {"reward": _round(rewards)}
    m = cfg.reference_samples_per_prompt
    if m:  # pi_ref's reward distribution per prompt, for the oracle tilt and best-of-n (estimators.py)
        many = [p for p in prompts for _ in range(m)]
        with autocast(device, cfg.precision):
            more, _ = sample(reference, tokenizer, many, cfg.max_new_tokens, 1.0, 1.0, cfg.seed + 1)
        scores = [float(r) for r in reward_fn([t for t in prompt_texts for _ in range(m)], more)]
        out["rewards_per_prompt"] = [_round(scores[i * m : (i + 1) * m]) for i in range(len(prompts))]
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(out))
    return out


def reference_fingerprint(cfg, reference, prompts, device) -> str:
    """What the reference's side depends on: weights, prompts' token ids, sampler, seed, reward, precision."""
    h = hashlib.sha256()
    for name, t in sorted(reference.state_dict().items()):
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    settings = (
        prompts,
        cfg.max_new_tokens,
        cfg.temperature,
        cfg.top_p,
        cfg.seed,
        cfg.reward,
        cfg.reference_samples_per_prompt,
        cfg.precision,
        device.type,
    )
    h.update(repr(settings).encode())
    return h.hexdigest()[:24]


def table(results) -> str:
    cols = []
    if "pairs" in results:
        cols += [
            ("implicit_reward_accuracy", "implicit-reward acc", "{:.3f}"),
            ("implicit_reward_margin", "margin", "{:+.3f}"),
        ]
    if "reward_fn" in results:
        cols += [
            ("reward", f"{results['reward_fn']} reward", "{:+.3f}"),
            ("reward_diff", "vs reference", "{:+.3f}"),
            ("kl", "KL(pi||ref)", "{:.2f}"),
            ("finished", "finished", "{:.2f}"),
        ]
    head = f"{'':<10}" + "".join(f"{c[1]:>22}" for c in cols)
    parts = [f"{results['dataset']}, {results['pairs']} pairs"] if "pairs" in results else []
    parts += [f"{results['num_samples']} sampled prompts"] if "num_samples" in results else []
    lines = ["held-out: " + ", ".join(parts), head]
    for name in ("reference", "policy"):
        r = results[name]
        cells = []
        for key, _, f in cols:
            v = f.format(r[key]) if key in r else ""
            if key + "_se" in r:
                v += f" ± {r[key + '_se']:.3f}"
            cells.append(f"{v:>22}")
        lines.append(f"{name:<10}" + "".join(cells))
    if "reward_fn" in results:
        same = results.get("kl_estimator") == KL_SAME_SAMPLES
        lines.append(
            f"(reward: samples at temperature {results.get('temperature', '?')}, top_p "
            f"{results.get('top_p', '?')}; vs reference: the paired difference over the same prompts; KL: "
            + ("on the same samples)" if same else "the untempered models', on separate samples at temperature 1)")
        )
    return "\n".join(lines)


def win_rate(rewards, baseline_rewards) -> tuple[float, float]:
    """How often a response beats the baseline's response to the same prompt under the reward (a tie counts
    half), with its standard error: the DPO paper's win rate against a baseline, judged by a reward
    function (or `rm:PATH`) instead of GPT-4 or people."""
    outcomes = [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(rewards, baseline_rewards)]
    return mean_se(outcomes)
