"""`dpokit verify loss_type=plackett_luce`: Plackett-Luce DPO recovers the closed-form optimum from K-way
rankings on verify.py's enumerable toy, and needs fewer ranked lists than DPO on the pairs split from them.

Data. A list: x uniform, K distinct responses drawn from pi_ref(.|x) one after another without replacement,
ranked by the Plackett-Luce model of the true reward, P(tau) = prod_k exp r(y_tau(k)) / sum_{j>=k}
exp r(y_tau(j)) (drawn exactly with the Gumbel trick: sort r + Gumbel noise). Its pairwise marginals are
Bradley-Terry's, s(r_i - r_j), so pi* = pi_ref exp(r/beta) / Z is the optimum of both Plackett-Luce DPO
(DPO paper, Appendix A.3: the same change of variables as for pairs) and DPO on every pair of a list.

Checked: Plackett-Luce DPO (ranking_losses.plackett_luce_loss, the trainer's code) trained on the
population of lists (every ordered K-tuple, weighted by its exact probability, when there are at most
POPULATION_LIMIT of them) lands on pi*, and on `num_rankings` sampled lists TV(pi, pi*) < tv_bound.
With `curve=true`: for growing numbers of lists, the TV of Plackett-Luce against DPO (sigmoid) on the
pairs the same lists give (ranking_losses.ranked_pair_losses, all_pairs and best_vs_worst), mean over
seeds. best_vs_worst's pairs are not Bradley-Terry distributed (the best of K beats the worst of K more
often than s(r_i - r_j) says), so it converges to a policy more extreme than pi*.
"""

import itertools
import math
import time

import torch

from dpokit.ranking_losses import plackett_luce_loss, ranked_pair_losses

POPULATION_LIMIT = 50_000  # ordered K-tuples per prompt, beyond which the population check is skipped
CURVE_SIZES = (250, 500, 1000, 2000, 4000, 8000)
CURVE_SEEDS = 5


def sampled_rankings(ref_logps, rewards, num_rankings: int, K: int, generator):
    """num_rankings lists of K distinct responses, best first, ranked by Plackett-Luce on r, as distinct
    (x (m,), list (m, K)) rows with their counts (m,)."""
    X, N = ref_logps.shape
    x = torch.randint(X, (num_rankings,), generator=generator)
    drawn = torch.multinomial(ref_logps[x].exp(), K, replacement=False, generator=generator)  # (n, K)
    u = torch.rand(num_rankings, K, generator=generator, dtype=torch.float64).clamp_min(1e-300)
    gumbel = -torch.log(-torch.log(u))
    order = torch.argsort(rewards[x[:, None], drawn] + gumbel, dim=-1, descending=True)  # best first
    # distinct (x, ranked list) rows with their counts: the full-batch loss is the count-weighted one
    rows, counts = torch.unique(torch.cat([x[:, None], drawn.gather(1, order)], 1), dim=0, return_counts=True)
    return rows[:, 0], rows[:, 1:], counts.double()


def population_rankings(ref_logps, rewards, K: int):
    """Every (x, ordered K-tuple best first) with weight rho(x) P(draw its set) P_PL(its order | set)."""
    X, N = ref_logps.shape
    tuples = torch.tensor(list(itertools.permutations(range(N), K)))  # (M, K), each set K! times
    xs, lists, weights = [], [], []
    for x in range(X):
        logp = ref_logps[x, tuples]  # (M, K): log pi_ref of each draw, in the tuple's order
        drawn_before = torch.cat([torch.zeros(len(tuples), 1, dtype=torch.float64), logp.exp().cumsum(-1)[:, :-1]], -1)
        log_draw = (logp - torch.log1p(-drawn_before)).sum(-1)  # successive sampling in this order
        r = rewards[x, tuples]  # (M, K)
        log_pl = (r - r.flip(-1).logcumsumexp(-1).flip(-1)).sum(-1)  # P_PL(this order | its set)
        key = tuples.sort(-1).values
        _, set_id = torch.unique(key, dim=0, return_inverse=True)
        p_set = torch.zeros(int(set_id.max()) + 1, dtype=torch.float64).index_add(0, set_id, log_draw.exp())
        xs.append(torch.full((len(tuples),), x)), lists.append(tuples)
        weights.append(p_set[set_id] * log_pl.exp() / X)
    return torch.cat(xs), torch.cat(lists), torch.cat(weights)


def train_plackett_luce(ref_logps, data, cfg):
    from dpokit.commands.verify import fit

    x, lists, weight = data
    weight = weight / weight.sum()
    ranks = torch.arange(lists.shape[1]).expand(lists.shape)  # lists are best first

    def objective(logps):
        losses, _ = plackett_luce_loss(logps[x[:, None], lists], ref_logps[x[:, None], lists], ranks, cfg.beta)
        return (weight * losses).sum()

    return fit(objective, ref_logps, cfg)[0]


def train_split_pairs(ref_logps, data, cfg, mode: str):
    """DPO (sigmoid) on the pairs `mode` splits each list into, each pair one example (a mean over pairs)."""
    from dpokit.commands.verify import fit

    x, lists, weight = data
    ranks = torch.arange(lists.shape[1]).expand(lists.shape)
    K = lists.shape[1]
    pairs_per_list = {"all_pairs": K * (K - 1) / 2, "best_vs_rest": K - 1, "best_vs_worst": 1}[mode]
    weight = weight / (weight.sum() * pairs_per_list)

    def objective(logps):
        pi, ref = logps[x[:, None], lists], ref_logps[x[:, None], lists]
        losses = ranked_pair_losses(["sigmoid"], None, pi, ref, ranks, mode, beta=cfg.beta)[0]  # (n,) sums
        return (weight * losses).sum()

    return fit(objective, ref_logps, cfg)[0]


def run_ranking_checks(cfg) -> dict:
    from dpokit.commands.verify import compare, expected_reward, make_problem, optimal_policy, tv

    start = time.time()
    g = torch.Generator().manual_seed(cfg.seed)
    ref_logps, rewards = make_problem(cfg, g)
    X, N = ref_logps.shape
    K = cfg.ranking_size
    opt_logp = optimal_policy(ref_logps, rewards, cfg.beta)
    print(
        f"toy problem: {X} prompts x {N} responses ({cfg.vocab_size} tokens, length {cfg.response_length}), "
        f"beta = {cfg.beta}, r ~ N(0, {cfg.reward_scale}^2); lists of K = {K} ranked by Plackett-Luce on r"
    )
    print(
        f"TV(pi_ref, pi*) = {tv(ref_logps, opt_logp).mean():.4f}; expected reward: pi_ref "
        f"{expected_reward(ref_logps, rewards):.4f}, pi* {expected_reward(opt_logp, rewards):.4f}"
    )
    results = {
        "pi_ref_reward": expected_reward(ref_logps, rewards),
        "pi_star_reward": expected_reward(opt_logp, rewards),
    }
    rows = []
    if math.perm(N, K) <= POPULATION_LIMIT:
        population = train_plackett_luce(ref_logps, population_rankings(ref_logps, rewards, K), cfg)
        results["population"] = compare(population, opt_logp, ref_logps, rewards, cfg.beta)
        rows.append(("population", "population (exact)"))
    data = sampled_rankings(ref_logps, rewards, cfg.num_rankings, K, g)
    results["sampled"] = compare(train_plackett_luce(ref_logps, data, cfg), opt_logp, ref_logps, rewards, cfg.beta)
    rows.append(("sampled", f"{cfg.num_rankings} ranked lists"))
    print("\nPlackett-Luce DPO vs the closed form pi* (mean over prompts; spread = max_x [max_y - min_y] (r_hat - r))")
    print(f"{'data':<24}{'TV':>9}{'TV max':>9}{'KL':>11}{'E[r]':>9}{'spread':>10}")
    for name, label in rows:
        m = results[name]
        print(
            f"{label:<24}{m['tv']:>9.4f}{m['tv_max']:>9.4f}{max(m['kl'], 0.0):>11.2e}{m['reward']:>9.4f}"
            f"{m['implicit_reward_spread']:>10.4f}"
        )
    if cfg.curve:
        results["curve"] = data_efficiency_curve(ref_logps, rewards, opt_logp, cfg)

    results["seconds"] = time.time() - start
    population_tv = results.get("population", {}).get("tv")
    results["passed"] = results["sampled"]["tv"] < cfg.tv_bound and (population_tv is None or population_tv < 1e-3)
    on_population = "" if population_tv is None else f", {population_tv:.1e} on the population"
    print(
        f"\n{'PASS' if results['passed'] else 'FAIL'}: TV(pi_PL, pi*) = {results['sampled']['tv']:.4f} with "
        f"{cfg.num_rankings} ranked lists of {K} (bound {cfg.tv_bound}){on_population}; {results['seconds']:.1f} s"
    )
    if not results["passed"]:
        raise SystemExit(1)
    return results


def data_efficiency_curve(ref_logps, rewards, opt_logp, cfg) -> list:
    """TV(pi, pi*) against the number of ranked lists: Plackett-Luce on the lists, DPO on their pairs."""
    from dpokit.commands.verify import tv

    K = cfg.ranking_size
    methods = {
        "plackett_luce": lambda data: train_plackett_luce(ref_logps, data, cfg),
        "all_pairs": lambda data: train_split_pairs(ref_logps, data, cfg, "all_pairs"),
        "best_vs_rest": lambda data: train_split_pairs(ref_logps, data, cfg, "best_vs_rest"),
        "best_vs_worst": lambda data: train_split_pairs(ref_logps, data, cfg, "best_vs_worst"),
    }
    print(
        f"\ndata efficiency: mean TV(pi, pi*) over {CURVE_SEEDS} seeds; DPO (sigmoid) on the pairs split from the "
        f"same lists ({K * (K - 1) // 2} per list for all_pairs, {K - 1} for best_vs_rest, 1 for best_vs_worst); "
        f"ratio: mean over seeds of TV(all_pairs) / TV(plackett_luce) on the same lists"
    )
    print(f"{'lists':>7}{'plackett_luce':>15}{'all_pairs':>11}{'best_vs_rest':>14}{'best_vs_worst':>15}{'ratio':>8}")
    curve = []
    for n in CURVE_SIZES:
        tvs, ratio = {name: 0.0 for name in methods}, 0.0
        for seed in range(CURVE_SEEDS):
            g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + 10_000 + 7919 * seed + n)
            data = sampled_rankings(ref_logps, rewards, n, K, g)
            this = {name: tv(train(data), opt_logp).mean().item() for name, train in methods.items()}
            for name in methods:
                tvs[name] += this[name] / CURVE_SEEDS
            ratio += this["all_pairs"] / this["plackett_luce"] / CURVE_SEEDS  # paired: the same lists
        curve.append({"lists": n, **tvs, "ratio": ratio})
        print(
            f"{n:>7}{tvs['plackett_luce']:>15.4f}{tvs['all_pairs']:>11.4f}{tvs['best_vs_rest']:>14.4f}"
            f"{tvs['best_vs_worst']:>15.4f}{ratio:>8.3f}"
        )
    for target in (0.04, 0.02):
        needed = {name: lists_to_reach(curve, name, target) for name in methods}
        shown = ", ".join(f"{k} {v}" for k, v in needed.items())
        print(f"lists to reach TV {target}: {shown}")
    return curve


def lists_to_reach(curve, name, target) -> str:
    """The number of lists at which the curve first crosses `target`, interpolated in log-log, as text
    ("<=250" or ">8000" when it is below from the start or never gets there)."""
    if curve[0][name] <= target:
        return f"<={curve[0]['lists']}"
    for a, b in zip(curve, curve[1:]):
        if a[name] > target >= b[name]:
            t = (math.log(a[name]) - math.log(target)) / (math.log(a[name]) - math.log(b[name]))
            return str(round(math.exp(math.log(a["lists"]) + t * (math.log(b["lists"]) - math.log(a["lists"])))))
    return f">{curve[-1]['lists']}"
