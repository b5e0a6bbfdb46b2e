"""The frontier's estimators against closed forms: the oracle tilt of a two-valued reward, best-of-n
against exact combinatorics and enumeration, the pool-adjacent-violators fit, paired standard errors."""

import itertools
import math

import numpy as np
import pytest

from dpokit.estimators import best_of_n, isotonic, mean_se, oracle_tilt, paired_difference, read_curve


def test_oracle_tilt_of_a_two_valued_reward_is_the_closed_form():
    """Rewards in {0, 1}, pi_ref(r = 1) = p exactly in the sample: pi* = pi_ref exp(r / beta) / Z gives
    q = p e^{1/beta} / (p e^{1/beta} + 1 - p), E[r] = q, KL = q log(q/p) + (1-q) log((1-q)/(1-p))."""
    rows = [[1.0] * 30 + [0.0] * 70, [1.0] * 80 + [0.0] * 20]  # p = 0.3 and 0.8
    for beta in (0.2, 0.5, 2.0):
        rewards, kls = [], []
        for p in (0.3, 0.8):
            q = p * math.exp(1 / beta) / (p * math.exp(1 / beta) + 1 - p)
            rewards.append(q)
            kls.append(q * math.log(q / p) + (1 - q) * math.log((1 - q) / (1 - p)))
        r, kl = oracle_tilt(rows, beta)
        assert r == pytest.approx(sum(rewards) / 2, abs=1e-12)
        assert kl == pytest.approx(sum(kls) / 2, abs=1e-12)
    assert oracle_tilt(rows, 1e6)[1] == pytest.approx(0.0, abs=1e-6)  # beta -> inf: pi* = pi_ref


def test_best_of_n_against_combinatorics_and_enumeration():
    # k ones among m: the best of a random n-subset is 1 unless all n are zeros
    m, k = 12, 3
    row = [1.0] * k + [0.0] * (m - k)
    for n in (1, 2, 4, 8):
        r, kl = best_of_n([row], n)
        assert r == pytest.approx(1 - math.comb(m - k, n) / math.comb(m, n))
        assert kl == pytest.approx(math.log(n) - (n - 1) / n)
    rng = np.random.default_rng(0)
    rows = rng.normal(size=(3, 7))
    for n in (2, 3, 7):
        brute = np.mean([np.mean([max(c) for c in itertools.combinations(row, n)]) for row in rows])
        assert best_of_n(rows, n)[0] == pytest.approx(brute)
    with pytest.raises(ValueError):
        best_of_n(rows, 8)


def test_isotonic_fit_and_reading_the_curve():
    xs, fitted = isotonic([3.0, 0.0, 1.0, 2.0], [4.0, 1.0, 3.0, 2.0])
    assert xs.tolist() == [0.0, 1.0, 2.0, 3.0] and fitted.tolist() == [1.0, 2.5, 2.5, 4.0]
    assert read_curve(xs, fitted, 2.5) == pytest.approx(3.25)
    assert math.isnan(read_curve(xs, fitted, 3.5))  # never extrapolated


def test_paired_difference_and_its_standard_error():
    a, b = [1.0, 2.0, 4.0], [0.5, 2.5, 3.0]
    d = [0.5, -0.5, 1.0]
    m = sum(d) / 3
    se = math.sqrt(sum((x - m) ** 2 for x in d) / 2 / 3)
    assert paired_difference(a, b) == pytest.approx((m, se))
    assert mean_se([2.0]) == (2.0, 0.0)
