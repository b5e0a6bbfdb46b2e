"""`dpokit verify`: the real loss code recovers the closed-form optimum on a toy problem small enough to
enumerate.

The toy. A few prompts x; the responses are every token sequence of length `response_length` over
`vocab_size` tokens (2^3 = 8 by default); the policy is a softmax over all of them, one logit per
(x, y), so it can represent any distribution and the DPO optimum is reachable. pi_ref and the
ground-truth reward r(x, y) are random. Preference pairs: y1 != y2 drawn from pi_ref(.|x), y1 preferred
with the Bradley-Terry probability s(r1 - r2). The policy starts at pi_ref and is trained with Adam in
float64 on the full batch, with the loss functions of `dpokit.losses` (the ones the trainer uses).

What is checked (DPO, arXiv 2305.18290):
  * Eq. 4: the KL-regularised reward maximiser is pi*(y|x) = pi_ref(y|x) exp(r(x,y)/beta) / Z(x); DPO
    trained on the population (every pair, weighted by its exact probability) must land on it, and on
    `num_pairs` sampled pairs close to it: TV(pi, pi*) < `tv_bound` (0.02 for 20,000 pairs).
  * Eq. 5: the implicit reward r_hat = beta log pi/pi_ref equals r up to a function of x alone, so
    r_hat(x, y) - r(x, y) has zero spread over y.
With finite data the DPO optimum is the *empirical* preference optimum (the Bradley-Terry MLE of the
sampled comparisons): the error of log pi is ~ (error of the reward estimate) / beta and shrinks like
1 / sqrt(comparisons per response). Hence the default setup: 3 prompts x 8 responses, a mildly non-uniform
pi_ref (so that pairs drawn from it cover every response: ~6,700 pairs per prompt, ~1,700 comparisons per
response) and beta = 2 (pi* still moves TV ~0.18 away from pi_ref). Over 30 seeds its TV with 20,000 pairs
had median 0.009 and max 0.016; with beta = 1 or skewed references, rarely-sampled responses that pi*
favours push single seeds past 0.02.

Deterministic labels (the higher reward always wins; Azar et al., arXiv 2310.12036, Sec. 4.2): the
Bradley-Terry reward gap is infinite, so DPO's optimum is a deterministic policy and training drifts
toward it; IPO has a finite optimum which, for pairs drawn i.i.d. from mu = pi_ref, is (setting the
gradient of E[(h - 1/(2 tau))^2] to zero, tau = beta, a tabular policy):

    pi_IPO(y|x) ~ pi_ref(y|x) exp( P(y > mu | x) / tau ),   P(y > mu) = mu(r < r(y)) + mu(y)/2

(the paper's Eq. 8 with Psi = identity); conservative DPO (label smoothing eps) has a finite optimum too.
This part trains on the population of pairs, so there is no sampling noise in the comparison.

`loss_type=plackett_luce` checks Plackett-Luce DPO on K-way rankings of the same toy instead
(commands/verify_rankings.py), ending with the same PASS / FAIL line.
"""

import math
import time
from dataclasses import dataclass

import torch

from dpokit.config import opt, resolve_config
from dpokit.errors import UserError
from dpokit.losses import LOSSES


@dataclass
class VerifyConfig:
    """Closed-form optimum check of the preference losses on an enumerable toy problem."""

    loss_type: str = opt(
        "sigmoid",
        "sigmoid: DPO on Bradley-Terry pairs (and IPO / cDPO on deterministic labels); plackett_luce: "
        "Plackett-Luce DPO on K-way rankings (commands/verify_rankings.py)",
        ["sigmoid", "plackett_luce"],
    )
    num_prompts: int = opt(3, "prompts x in the toy problem")
    vocab_size: int = opt(2, "tokens in the toy vocabulary")
    response_length: int = opt(3, "tokens per response; the policy covers all vocab_size**response_length of them")
    beta: float = opt(2.0, "KL strength beta (IPO's tau); finite data's error in log pi is ~ reward error / beta")
    reward_scale: float = opt(1.0, "standard deviation of the ground-truth rewards r(x, y)")
    reference_scale: float = opt(0.3, "standard deviation of pi_ref's logits (0: uniform reference, best coverage)")
    num_pairs: int = opt(20000, "sampled preference pairs for the finite-data check")
    steps: int = opt(1500, "full-batch Adam steps per training run")
    learning_rate: float = opt(0.05, "Adam learning rate (cosine-decayed to 0)")
    label_smoothing: float = opt(0.1, "cDPO's flip probability eps in the deterministic-label comparison")
    ranking_size: int = opt(4, "plackett_luce: responses K per ranked list")
    num_rankings: int = opt(5000, "plackett_luce: sampled ranked lists for the finite-data check")
    curve: bool = opt(
        False,
        "plackett_luce: also print TV against the number of lists, Plackett-Luce vs DPO on the pairs split "
        "from the same lists (120 more training runs: ~10 minutes on a busy 2-core CPU)",
    )
    tv_bound: float = opt(0.02, "largest acceptable mean TV(pi, pi*) with num_pairs sampled pairs (num_rankings lists)")
    seed: int = opt(0, "seed of the toy problem and the sampled pairs")

    # --- the toy problem -----------------------------------------------------------------------------------

    def check(self):
        n = self.vocab_size**self.response_length
        if self.vocab_size < 1 or self.response_length < 1 or not 2 <= n <= 1024:
            raise UserError(f"vocab_size ** response_length must be between 2 and 1024 responses, got {n}")
        if self.loss_type == "plackett_luce" and not 2 <= self.ranking_size <= n:
            raise UserError(f"key 'ranking_size': must be between 2 and the {n} responses, got {self.ranking_size}")
        for name in ("num_prompts", "num_pairs", "num_rankings", "steps"):
            if getattr(self, name) < 1:
                raise UserError(f"key '{name}': must be at least 1, got {getattr(self, name)}")
        for name in ("beta", "learning_rate", "tv_bound"):
            if not getattr(self, name) > 0:
                raise UserError(f"key '{name}': must be positive, got {getattr(self, name)}")
        if not 0 <= self.label_smoothing < 0.5:
            raise UserError(f"key 'label_smoothing': must be in [0, 0.5), got {self.label_smoothing}")


def make_problem(cfg, generator):
    """pi_ref's log-probs and the rewards, both (X, N), float64."""
    X, N = cfg.num_prompts, cfg.vocab_size**cfg.response_length  # N: every token sequence
    ref_logits = cfg.reference_scale * torch.randn(X, N, generator=generator, dtype=torch.float64)
    ref_logps = torch.log_softmax(ref_logits, -1)
    rewards = cfg.reward_scale * torch.randn(X, N, generator=generator, dtype=torch.float64)
    return ref_logps, rewards


def optimal_policy(ref_logps, rewards, beta):
    """log pi*(y|x) = log pi_ref(y|x) + r(x,y)/beta - log Z(x)  (DPO, Eq. 4). (X, N)"""
    return torch.log_softmax(ref_logps + rewards / beta, -1)


def ipo_optimal_policy(ref_logps, rewards, tau):
    """log pi_IPO for deterministic labels, pairs i.i.d. from mu = pi_ref (derivation in the docstring)."""
    mu = ref_logps.exp()  # (X, N)
    beats = (rewards[:, :, None] > rewards[:, None, :]).double()  # (X, N, N): y beats y'
    p_win = (beats * mu[:, None, :]).sum(-1) + mu / 2  # P(y > mu), (X, N)
    return torch.log_softmax(ref_logps + p_win / tau, -1)


def population_pairs(ref_logps, rewards, deterministic: bool):
    """Every ordered pair (x, winner, loser), winner != loser, weighted by rho(x) mu(w) mu(l) p(w > l)."""
    X, N = ref_logps.shape
    x, w, l = torch.meshgrid(torch.arange(X), torch.arange(N), torch.arange(N), indexing="ij")
    x, w, l = x.flatten(), w.flatten(), l.flatten()
    keep = w != l
    x, w, l = x[keep], w[keep], l[keep]
    gap = rewards[x, w] - rewards[x, l]
    p_win = (gap > 0).double() if deterministic else torch.sigmoid(gap)
    weight = ref_logps[x, w].exp() * ref_logps[x, l].exp() * p_win / X
    return x, w, l, weight


def sampled_pairs(ref_logps, rewards, num_pairs, generator):
    """num_pairs comparisons: x uniform, y1 != y2 ~ pi_ref(.|x) i.i.d. (a draw with y1 == y2 is redrawn),
    labelled by Bradley-Terry. Returned as distinct (x, winner, loser) triples with their counts: the
    full-batch loss over the pairs is the count-weighted loss over the triples."""
    X, N = ref_logps.shape
    xs, y1s, y2s = [], [], []
    while sum(len(x) for x in xs) < num_pairs:
        x = torch.randint(X, (num_pairs,), generator=generator)
        y = torch.multinomial(ref_logps[x].exp(), 2, replacement=True, generator=generator)  # (n, 2)
        keep = y[:, 0] != y[:, 1]
        xs.append(x[keep]), y1s.append(y[keep, 0]), y2s.append(y[keep, 1])
    x, y1, y2 = (torch.cat(t)[:num_pairs] for t in (xs, y1s, y2s))
    first_wins = torch.rand(num_pairs, generator=generator, dtype=torch.float64) < torch.sigmoid(
        rewards[x, y1] - rewards[x, y2]
    )
    w, l = torch.where(first_wins, y1, y2), torch.where(first_wins, y2, y1)
    triples, counts = torch.unique(torch.stack([x, w, l]), dim=1, return_counts=True)
    return triples[0], triples[1], triples[2], counts.double()


# --- training with the library's losses ---------------------------------------------------------------


def train(loss_type, ref_logps, pairs, cfg, record_at=(), **hyper):
    """Adam on one logit per (x, y), from pi_ref, on the pairs' loss. Returns the final log pi (X, N) and
    {step: log pi}."""
    x, w, l, weight = pairs
    weight = weight / weight.sum()
    loss_fn = LOSSES[loss_type].fn

    def objective(logps):  # (X, N) -> the weighted mean loss over the pairs
        losses, _, _ = loss_fn(logps[x, w], logps[x, l], ref_logps[x, w], ref_logps[x, l], beta=cfg.beta, **hyper)
        return (weight * losses).sum()

    return fit(objective, ref_logps, cfg, record_at)


def fit(objective, ref_logps, cfg, record_at=()):
    """Full-batch Adam (cosine-decayed) on one logit per (x, y), from pi_ref, minimising objective(log pi).
    Returns the final log pi (X, N) and {step: log pi}."""
    logits = ref_logps.clone().requires_grad_()
    optimizer = torch.optim.Adam([logits], lr=cfg.learning_rate)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / cfg.steps)))
    snapshots = {}
    for step in range(cfg.steps + 1):
        if step in record_at:
            snapshots[step] = torch.log_softmax(logits.detach(), -1)
        if step == cfg.steps:
            break
        loss = objective(torch.log_softmax(logits, -1))  # of log pi, (X, N)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    return torch.log_softmax(logits.detach(), -1), snapshots


# --- what is reported ------------------------------------------------------------------------------------


def tv(logp, logq):
    """Total variation per prompt, (X,)."""
    return 0.5 * (logp.exp() - logq.exp()).abs().sum(-1)


def kl(logp, logq):
    """KL(p || q) per prompt, (X,)."""
    return (logp.exp() * (logp - logq)).sum(-1)


def entropy(logp):
    return -(logp.exp() * logp).sum(-1)


def expected_reward(logp, rewards):
    return (logp.exp() * rewards).sum(-1).mean().item()


def compare(logp, opt_logp, ref_logps, rewards, beta):
    """The numbers of the closed-form check for a trained policy log pi (X, N)."""
    gap = beta * (logp - ref_logps) - rewards  # r_hat - r, (X, N)
    return {
        "tv": tv(logp, opt_logp).mean().item(),
        "tv_max": tv(logp, opt_logp).max().item(),
        "kl": kl(logp, opt_logp).mean().item(),
        "reward": expected_reward(logp, rewards),
        "implicit_reward_spread": (gap.max(-1).values - gap.min(-1).values).max().item(),
    }


def verify(config=None) -> dict:
    """Print the tables and return their numbers; SystemExit(1) if the check fails (so CI can run it).
    config: a VerifyConfig, a dict of its keys, or a YAML path."""
    cfg = resolve_config(VerifyConfig, config)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tensors of a few hundred numbers: threads only add overhead
    try:
        if cfg.loss_type == "plackett_luce":
            from dpokit.commands.verify_rankings import run_ranking_checks

            return run_ranking_checks(cfg)
        return run_checks(cfg)
    finally:
        torch.set_num_threads(threads)


def run_checks(cfg: VerifyConfig) -> dict:
    start = time.time()
    g = torch.Generator().manual_seed(cfg.seed)
    ref_logps, rewards = make_problem(cfg, g)
    X, N = ref_logps.shape
    opt_logp = optimal_policy(ref_logps, rewards, cfg.beta)
    print(
        f"toy problem: {X} prompts x {N} responses ({cfg.vocab_size} tokens, length {cfg.response_length}), "
        f"beta = {cfg.beta}, r ~ N(0, {cfg.reward_scale}^2)"
    )
    print(
        f"TV(pi_ref, pi*) = {tv(ref_logps, opt_logp).mean():.4f}; expected reward: pi_ref "
        f"{expected_reward(ref_logps, rewards):.4f}, pi* {expected_reward(opt_logp, rewards):.4f}"
    )

    # 1. DPO recovers pi* = pi_ref exp(r/beta) / Z: on the population, and on sampled pairs
    population, _ = train("sigmoid", ref_logps, population_pairs(ref_logps, rewards, False), cfg)
    sampled, _ = train("sigmoid", ref_logps, sampled_pairs(ref_logps, rewards, cfg.num_pairs, g), cfg)
    results = {
        "pi_ref_reward": expected_reward(ref_logps, rewards),
        "pi_star_reward": expected_reward(opt_logp, rewards),
        "population": compare(population, opt_logp, ref_logps, rewards, cfg.beta),
        "sampled": compare(sampled, opt_logp, ref_logps, rewards, cfg.beta),
    }
    print("\nDPO (sigmoid) vs the closed form pi* (mean over prompts; spread = max_x [max_y - min_y] (r_hat - r))")
    print(f"{'data':<24}{'TV':>9}{'TV max':>9}{'KL':>11}{'E[r]':>9}{'spread':>10}")
    for name, label in [("population", "population (exact)"), ("sampled", f"{cfg.num_pairs} sampled pairs")]:
        m = results[name]
        print(
            f"{label:<24}{m['tv']:>9.4f}{m['tv_max']:>9.4f}{max(m['kl'], 0.0):>11.2e}{m['reward']:>9.4f}"
            f"{m['implicit_reward_spread']:>10.4f}"
        )

    # 2. deterministic labels: DPO drifts to a deterministic policy, IPO and cDPO stay at finite optima
    pairs = population_pairs(ref_logps, rewards, True)
    record_at = sorted({0, cfg.steps // 100, cfg.steps // 30, cfg.steps // 10, cfg.steps // 3, cfg.steps})
    ipo_logp = ipo_optimal_policy(ref_logps, rewards, cfg.beta)
    runs = {
        "dpo": train("sigmoid", ref_logps, pairs, cfg, record_at)[1],
        "ipo": train("ipo", ref_logps, pairs, cfg, record_at)[1],
        "cdpo": train("sigmoid", ref_logps, pairs, cfg, record_at, label_smoothing=cfg.label_smoothing)[1],
    }
    table = {
        name: [
            {
                "step": s,
                "max_prob": lp.exp().max(-1).values.mean().item(),
                "entropy": entropy(lp).mean().item(),
                "tv_ipo_optimum": tv(lp, ipo_logp).mean().item(),
            }
            for s, lp in snaps.items()
        ]
        for name, snaps in runs.items()
    }
    results["deterministic"] = table
    results["ipo_optimum"] = {
        "max_prob": ipo_logp.exp().max(-1).values.mean().item(),
        "entropy": entropy(ipo_logp).mean().item(),
    }
    print(
        "\ndeterministic labels (higher reward wins), population pairs; mean over prompts of max_y pi(y|x), "
        "entropy H, and TV to IPO's closed-form optimum"
    )
    print(
        f"{'step':>7} | {'DPO max':>8}{'H':>7} | {'IPO max':>8}{'H':>7}{'TV':>8} | "
        f"{'cDPO max':>9}{'H':>7}   (eps = {cfg.label_smoothing})"
    )
    for i, step in enumerate(record_at):
        d, p, c = (table[k][i] for k in ("dpo", "ipo", "cdpo"))
        print(
            f"{step:>7} | {d['max_prob']:>8.4f}{d['entropy']:>7.3f} | {p['max_prob']:>8.4f}{p['entropy']:>7.3f}"
            f"{p['tv_ipo_optimum']:>8.4f} | {c['max_prob']:>9.4f}{c['entropy']:>7.3f}"
        )
    best = results["ipo_optimum"]
    print(
        f"{'optimum':>7} | {'1 (argmax r)':>15} | {best['max_prob']:>8.4f}{best['entropy']:>7.3f}{'':>8} | "
        f"{'finite':>16}   <- IPO closed form pi_ref exp(P(y > mu)/tau) / Z"
    )

    results["seconds"] = time.time() - start
    results["passed"] = results["sampled"]["tv"] < cfg.tv_bound and results["population"]["tv"] < 1e-3
    print(
        f"\n{'PASS' if results['passed'] else 'FAIL'}: TV(pi_DPO, pi*) = {results['sampled']['tv']:.4f} with "
        f"{cfg.num_pairs} pairs (bound {cfg.tv_bound}), {results['population']['tv']:.1e} on the population; "
        f"{results['seconds']:.1f} s"
    )
    if not results["passed"]:
        raise SystemExit(1)
    return results
