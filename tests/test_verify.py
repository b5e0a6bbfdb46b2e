"""`dpokit verify` on a smaller budget: DPO recovers pi* = pi_ref exp(r/beta)/Z, the implicit reward is r up to
a function of x, and with deterministic labels DPO drifts toward a deterministic policy while IPO sits at its
closed-form optimum and cDPO stays bounded."""

import math

import pytest

from dpokit.cli import main
from dpokit.commands.verify import VerifyConfig
from dpokit.commands.verify import verify as run

SMALL = dict(num_pairs=4000, steps=600, tv_bound=0.04)  # over seeds 0-9 the TV was 0.018-0.030


@pytest.fixture(scope="module", params=[0, 1])
def results(request):
    return run(VerifyConfig(seed=request.param, **SMALL))


def test_dpo_recovers_the_closed_form_optimum(results):
    assert results["population"]["tv"] < 1e-6  # exact expectation: the optimum itself
    assert results["population"]["kl"] < 1e-9
    assert results["sampled"]["tv"] < 0.04  # 4,000 sampled pairs: the empirical optimum
    assert results["population"]["reward"] == pytest.approx(results["pi_star_reward"], abs=1e-6)
    assert results["pi_star_reward"] > results["pi_ref_reward"]


def test_implicit_reward_is_the_reward_up_to_a_function_of_x(results):
    assert results["population"]["implicit_reward_spread"] < 1e-6
    assert results["sampled"]["implicit_reward_spread"] < 1.0  # finite data: estimation error only


def test_deterministic_labels(results):
    dpo, ipo, cdpo = (results["deterministic"][k] for k in ("dpo", "ipo", "cdpo"))
    # DPO: the probability of the best response keeps growing, the entropy keeps falling
    assert all(a["max_prob"] < b["max_prob"] for a, b in zip(dpo[1:], dpo[2:]))
    assert all(a["entropy"] > b["entropy"] for a, b in zip(dpo[1:], dpo[2:]))
    assert dpo[-1]["max_prob"] > ipo[-1]["max_prob"] + 0.3
    # IPO: at its own closed form pi_ref exp(P(y > mu)/tau) / Z
    assert ipo[-1]["tv_ipo_optimum"] < 1e-4
    assert ipo[-1]["max_prob"] == pytest.approx(results["ipo_optimum"]["max_prob"], abs=1e-4)
    # cDPO: settled at a finite optimum, well short of DPO's drift
    assert abs(cdpo[-1]["max_prob"] - cdpo[-2]["max_prob"]) < 1e-3
    assert cdpo[-1]["max_prob"] < dpo[-1]["max_prob"] - 0.2


def test_cli(capsys):
    assert main(["verify", "num_pairs=2000", "steps=300", "tv_bound=0.1"]) == 0
    out = capsys.readouterr().out
    assert "PASS" in out and "IPO closed form" in out


def test_cli_bad_setup_is_a_user_error(capsys):
    assert main(["verify", "vocab_size=1"]) == 2
    assert "vocab_size" in capsys.readouterr().err


# --- ranking mode: Plackett-Luce DPO on K-way rankings ------------------------------------------------------


def test_plackett_luce_recovers_the_closed_form_optimum():
    """On the population of ranked lists (every ordered 3-tuple, exact weights) Plackett-Luce DPO lands on
    pi* = pi_ref exp(r/beta)/Z; on 1,500 sampled lists near it (TV 0.019-0.021 over seeds 0-2; the defaults,
    5,000 lists of 4: TV 0.007-0.011 over seeds 0-5)."""
    cfg = VerifyConfig(loss_type="plackett_luce", ranking_size=3, num_rankings=1500, steps=600, tv_bound=0.04)
    results = run(cfg)
    assert results["passed"]
    assert results["population"]["tv"] < 1e-6 and results["population"]["implicit_reward_spread"] < 1e-6
    assert results["sampled"]["tv"] < 0.04
    assert results["population"]["reward"] == pytest.approx(results["pi_star_reward"], abs=1e-6)


def test_ranking_cli(capsys):
    args = ["verify", "loss_type=plackett_luce", "ranking_size=2", "num_rankings=1000", "steps=300"]
    assert main([*args, "tv_bound=0.1"]) == 0
    out = capsys.readouterr().out
    assert "lists of K = 2" in out and out.strip().splitlines()[-1].startswith("PASS: TV(pi_PL, pi*) = ")
    assert main(["verify", "loss_type=plackett_luce", "ranking_size=9"]) == 2
    assert "ranking_size" in capsys.readouterr().err


@pytest.mark.slow
def test_ranking_curve_runs_and_best_vs_worst_is_biased(monkeypatch):
    """curve=true on a small budget: every method is reported, and DPO on best-vs-worst pairs, which are not
    Bradley-Terry distributed, stays far from pi* where Plackett-Luce and all pairs (consistent) get close."""
    from dpokit.commands import verify_rankings

    monkeypatch.setattr(verify_rankings, "CURVE_SIZES", (300, 3000))
    monkeypatch.setattr(verify_rankings, "CURVE_SEEDS", 1)
    cfg = VerifyConfig(loss_type="plackett_luce", ranking_size=3, num_rankings=1500, steps=400, tv_bound=0.05)
    results = run(cfg.__class__(**{**cfg.__dict__, "curve": True}))
    big = results["curve"][-1]
    assert [p["lists"] for p in results["curve"]] == [300, 3000]
    assert big["plackett_luce"] < 0.03 and big["all_pairs"] < 0.03 and big["best_vs_rest"] < 0.04
    assert big["best_vs_worst"] > 2 * big["plackett_luce"]
    curve = [{"lists": 250, "a": 0.05}, {"lists": 500, "a": 0.03}, {"lists": 1000, "a": 0.01}]
    t = math.log(0.05 / 0.04) / math.log(0.05 / 0.03)  # where 0.04 falls between 0.05 and 0.03, in log TV
    assert verify_rankings.lists_to_reach(curve, "a", 0.04) == str(round(250 * 2**t))  # 338, in log lists
    assert verify_rankings.lists_to_reach(curve, "a", 0.06) == "<=250"
    assert verify_rankings.lists_to_reach(curve, "a", 0.001) == ">1000"
