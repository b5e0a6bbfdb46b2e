"""Estimators of the reward/KL frontier from per-prompt numbers (pure functions of lists and arrays).

- mean_se, paired_difference: a mean with its standard error; the mean of per-prompt differences of
  two policies' rewards on the same prompts, with the paired standard error (the prompts' own
  difficulty cancels).
- oracle_tilt: the KL-constrained optimum pi*(y|x) = pi_ref(y|x) exp(r(x, y)/beta) / Z(x) (DPO paper,
  Eq. 4), estimated from m samples y_j ~ pi_ref per prompt by self-normalised importance weights
  w_j = exp(r_j/beta) / sum_l exp(r_l/beta): E_pi*[r] ~ sum_j w_j r_j and KL(pi* || pi_ref) =
  E_pi*[log pi*/pi_ref] ~ sum_j w_j log(m w_j). Consistent as m grows; at large KL (small beta) the
  weights sit on few samples and the estimate saturates at log m nats: use it below ~log(m) - 1.
- best_of_n: the reward of the best of n samples from pi_ref, E[max_{i<=n} r_i], estimated without bias
  from m >= n samples per prompt by order statistics (the i-th smallest of m is the maximum of a random
  n-subset with probability C(i-1, n-1) / C(m, n)); its KL is the analytic log n - (n-1)/n (Beirami et
  al., 2024, an upper bound that is tight for continuous rewards).
- isotonic: the pool-adjacent-violators fit of a non-decreasing curve, the frontier estimate of a
  method (reward as a non-decreasing function of KL), read at a KL by linear interpolation between
  the fitted points and never extrapolated past the method's largest KL.
"""

import math

import numpy as np


def mean_se(xs) -> tuple[float, float]:
    """Mean and standard error (sample standard deviation / sqrt(n); 0 for one value)."""
    xs = np.asarray(xs, dtype=float)
    n = len(xs)
    return float(xs.mean()), float(xs.std(ddof=1) / math.sqrt(n)) if n > 1 else 0.0


def paired_difference(a, b) -> tuple[float, float]:
    """Mean of a_i - b_i over the same prompts, with its paired standard error."""
    if len(a) != len(b):
        raise ValueError(f"paired difference of {len(a)} and {len(b)} values")
    return mean_se(np.asarray(a, dtype=float) - np.asarray(b, dtype=float))


def oracle_tilt(rewards_per_prompt, beta: float) -> tuple[float, float]:
    """rewards_per_prompt (P, m) of pi_ref's samples -> (E_pi*[r], KL(pi* || pi_ref)) averaged over prompts."""
    r = np.asarray(rewards_per_prompt, dtype=float)  # (P, m)
    m = r.shape[1]
    z = r / beta
    log_w = z - np.logaddexp.reduce(z, axis=1, keepdims=True)  # (P, m), log of the normalised weights
    w = np.exp(log_w)
    reward = (w * r).sum(1)
    kl = (w * (log_w + math.log(m))).sum(1)
    return float(reward.mean()), float(kl.mean())


def best_of_n(rewards_per_prompt, n: int) -> tuple[float, float]:
    """rewards_per_prompt (P, m), m >= n -> (E[max of n samples' rewards], log n - (n-1)/n)."""
    r = np.sort(np.asarray(rewards_per_prompt, dtype=float), axis=1)  # ascending
    m = r.shape[1]
    if n > m:
        raise ValueError(f"best of {n} needs at least {n} samples per prompt, got {m}")
    # P(the i-th smallest, i = 1..m, is the max of a random n-subset) = C(i-1, n-1) / C(m, n)
    weights = np.array([math.comb(i - 1, n - 1) for i in range(1, m + 1)], dtype=float) / math.comb(m, n)
    return float((r * weights).sum(1).mean()), math.log(n) - (n - 1) / n


def isotonic(x, y) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares non-decreasing fit of y on x (pool adjacent violators) -> (sorted x, fitted y)."""
    order = np.argsort(np.asarray(x, dtype=float), kind="stable")
    xs, ys = np.asarray(x, dtype=float)[order], np.asarray(y, dtype=float)[order]
    blocks = []  # [mean, weight, count]
    for v in ys:
        blocks.append([v, 1.0, 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            (m2, w2, c2), (m1, w1, c1) = blocks.pop(), blocks.pop()
            blocks.append([(m1 * w1 + m2 * w2) / (w1 + w2), w1 + w2, c1 + c2])
    fitted = np.concatenate([[m] * c for m, _, c in blocks])
    return xs, fitted


def read_curve(xs, fitted, at: float) -> float:
    """The fitted curve at KL `at`, by linear interpolation; nan past the largest KL (not reached)."""
    if len(xs) == 0 or at > xs[-1] or at < xs[0]:
        return float("nan")
    return float(np.interp(at, xs, fitted))


def frontier_curves(point_rewards, point_kls, reference_rewards, at, indices=None) -> np.ndarray:
    """One method's frontier read at the KLs `at`: the isotonic fit through the reference (KL 0, its
    mean reward) and the method's points, each a mean over prompts (`indices`: the prompts to average,
    with repeats, for a bootstrap replicate; (B, P) gives B replicates) -> (len(at),) or (B, len(at))."""
    R = np.asarray(point_rewards, dtype=float)  # (n, P)
    K = np.asarray(point_kls, dtype=float)  # (n, P)
    ref = np.asarray(reference_rewards, dtype=float)  # (P,)
    single = indices is None
    idx = np.arange(R.shape[1])[None] if single else np.asarray(indices)  # (B, P)
    rewards, kls, ref_means = R[:, idx].mean(-1), K[:, idx].mean(-1), ref[idx].mean(-1)  # (n, B), (n, B), (B,)
    out = np.empty((idx.shape[0], len(at)))
    for b in range(idx.shape[0]):
        xs, fitted = isotonic(np.r_[0.0, kls[:, b]], np.r_[ref_means[b], rewards[:, b]])
        out[b] = [read_curve(xs, fitted, x) for x in at]
    return out[0] if single else out


def compare_at(curves_a, curves_b, point_a, point_b, level: float = 0.95) -> dict:
    """Bootstrap replicates (B,) of two methods' frontiers at one KL (the same prompt resamples for both)
    -> the difference a - b, its percentile interval, and the fraction of replicates where either
    curve did not reach this KL."""
    a, b = np.asarray(curves_a, dtype=float), np.asarray(curves_b, dtype=float)
    ok = ~(np.isnan(a) | np.isnan(b))
    lo_q, hi_q = (1 - level) / 2 * 100, (1 + level) / 2 * 100
    if not ok.any() or math.isnan(point_a) or math.isnan(point_b):
        return {"difference": float("nan"), "low": float("nan"), "high": float("nan"), "unreached": 1.0}
    d = a[ok] - b[ok]
    return {
        "difference": float(point_a - point_b),
        "low": float(np.percentile(d, lo_q)),
        "high": float(np.percentile(d, hi_q)),
        "unreached": float(1 - ok.mean()),
    }
