"""Every loss of losses.py against an independent float64 numpy re-implementation written from its paper's
formula: values, and gradients (torch autograd on the library vs central finite differences of the numpy
version). Also the DPO gradient in the paper's form, combined_loss, reference-free losses, KTO, BCO's
running mean and TR-DPO's reference update."""

import math

import numpy as np
import pytest
import torch

from dpokit import losses as L

# --- the papers' formulas, in numpy ------------------------------------------------------------------------
# pc, pr, rc, rr: policy / reference log-probs of chosen (w) and rejected (l); lc, lr: lengths.


def logsig(x):
    return -np.logaddexp(0.0, -x)


def sig(x):
    return np.exp(logsig(x))


def margins(pc, pr, rc, rr):
    a, b = pc - rc, pr - rr  # log pi/pi_ref of y_w and of y_l
    return a, b, a - b


def np_sigmoid(pc, pr, rc, rr, lc, lr, beta, label_smoothing=0.0):  # DPO Eq. 7 / cDPO
    h = margins(pc, pr, rc, rr)[2]
    return -(1 - label_smoothing) * logsig(beta * h) - label_smoothing * logsig(-beta * h)


def np_robust(pc, pr, rc, rr, lc, lr, beta, label_smoothing=0.0):  # rDPO
    h, e = margins(pc, pr, rc, rr)[2], label_smoothing
    return ((1 - e) * -logsig(beta * h) - e * -logsig(-beta * h)) / (1 - 2 * e)


def np_ipo(pc, pr, rc, rr, lc, lr, beta, ipo_length_normalize=False):  # IPO Eq. 17, tau = beta
    a, b, h = margins(pc, pr, rc, rr)
    if ipo_length_normalize:
        h = a / lc - b / lr
    return (h - 1 / (2 * beta)) ** 2


def np_hinge(pc, pr, rc, rr, lc, lr, beta):  # SLiC / RSO
    return np.maximum(0.0, 1 - beta * margins(pc, pr, rc, rr)[2])


def np_nca_pair(pc, pr, rc, rr, lc, lr, beta):  # NCA, K = 2
    a, b, _ = margins(pc, pr, rc, rr)
    ra, rb = beta * a, beta * b
    return -logsig(ra) - 0.5 * (logsig(-ra) + logsig(-rb))


def np_exo_pair(pc, pr, rc, rr, lc, lr, beta, label_smoothing=1e-3):  # EXO: KL(p_theta || p_label)
    z = beta * margins(pc, pr, rc, rr)[2]
    p = np.stack([sig(z), sig(-z)])  # model's distribution over (w, l)
    q = np.array([1 - label_smoothing, label_smoothing])[:, None]
    return (p * (np.log(p) - np.log(q))).sum(0)


def np_bco_pair(pc, pr, rc, rr, lc, lr, beta, bco_delta=None):  # BCO
    a, b, _ = margins(pc, pr, rc, rr)
    delta = np.concatenate([beta * a, beta * b]).mean() if bco_delta is None else bco_delta
    return -logsig(beta * a - delta) - logsig(delta - beta * b)


def np_sppo_hard(pc, pr, rc, rr, lc, lr, beta):  # SPPO, eta = 1/beta, P in {0, 1}
    a, b, _ = margins(pc, pr, rc, rr)
    eta = 1 / beta
    return (a - eta * (1 - 0.5)) ** 2 + (b - eta * (0 - 0.5)) ** 2


def np_apo_zero(pc, pr, rc, rr, lc, lr, beta):
    a, b, _ = margins(pc, pr, rc, rr)
    return 1 - sig(beta * a) + sig(beta * b)


def np_apo_down(pc, pr, rc, rr, lc, lr, beta):
    a, b, h = margins(pc, pr, rc, rr)
    return sig(beta * a) + 1 - sig(beta * h)


def np_aot(pc, pr, rc, rr, lc, lr, beta, label_smoothing=0.0):
    d = np.sort(pc - pr) - np.sort(rc - rr)
    return -(1 - label_smoothing) * logsig(beta * d) - label_smoothing * logsig(-beta * d)


def np_aot_pair(pc, pr, rc, rr, lc, lr, beta, label_smoothing=0.0):
    a, b, _ = margins(pc, pr, rc, rr)
    d = np.sort(a) - np.sort(b)
    return -(1 - label_smoothing) * logsig(beta * d) - label_smoothing * logsig(-beta * d)


def np_discopop(pc, pr, rc, rr, lc, lr, beta, discopop_tau=0.05):
    rho = beta * margins(pc, pr, rc, rr)[2]
    m = sig(rho / discopop_tau)
    return (1 - m) * -logsig(rho) + m * np.exp(-rho)


def np_simpo(pc, pr, rc, rr, lc, lr, beta, simpo_gamma=0.5):  # SimPO Eq. 6
    return -logsig(beta / lc * pc - beta / lr * pr - simpo_gamma)


def np_orpo(pc, pr, rc, rr, lc, lr, beta):  # ORPO Eqs. 6-7, lambda = beta
    p_w, p_l = np.exp(pc / lc), np.exp(pr / lr)  # length-normalised sequence probabilities
    odds_ratio = (p_w / (1 - p_w)) / (p_l / (1 - p_l))
    return -pc / lc - beta * logsig(np.log(odds_ratio))


def np_sft(pc, pr, rc, rr, lc, lr, beta):
    return -pc / lc


def np_sigmoid_norm(pc, pr, rc, rr, lc, lr, beta, label_smoothing=0.0):  # DPO on per-token log-ratios
    z = beta * ((pc - rc) / lc - (pr - rr) / lr)
    return -(1 - label_smoothing) * logsig(z) - label_smoothing * logsig(-z)


REFERENCES = {
    "sigmoid": (np_sigmoid, [{}, {"label_smoothing": 0.2}]),
    "robust": (np_robust, [{}, {"label_smoothing": 0.2}]),
    "ipo": (np_ipo, [{}, {"ipo_length_normalize": True}]),
    "hinge": (np_hinge, [{}]),
    "nca_pair": (np_nca_pair, [{}]),
    "exo_pair": (np_exo_pair, [{}, {"label_smoothing": 0.1}]),
    "bco_pair": (np_bco_pair, [{}, {"bco_delta": 0.3}]),
    "sppo_hard": (np_sppo_hard, [{}]),
    "apo_zero": (np_apo_zero, [{}]),
    "apo_down": (np_apo_down, [{}]),
    "aot": (np_aot, [{}, {"label_smoothing": 0.1}]),
    "aot_pair": (np_aot_pair, [{}, {"label_smoothing": 0.1}]),
    "discopop": (np_discopop, [{}, {"discopop_tau": 0.5}]),
    "simpo": (np_simpo, [{}, {"simpo_gamma": 1.2}]),
    "orpo": (np_orpo, [{}]),
    "sft": (np_sft, [{}]),
    "sigmoid_norm": (np_sigmoid_norm, [{}, {"label_smoothing": 0.2}]),
}


def random_inputs(seed, B=7):
    """Sequence log-probs (sums over tokens) with margins h of a few nats, and their lengths."""
    rng = np.random.default_rng(seed)
    lc, lr = rng.integers(3, 30, B).astype(float), rng.integers(3, 30, B).astype(float)
    pc = -lc * rng.uniform(0.1, 2.0, B)  # average token log-prob in (-2, -0.1)
    pr = -lr * rng.uniform(0.1, 2.0, B)
    rc, rr = pc + rng.normal(0, 2.0, B), pr + rng.normal(0, 2.0, B)
    return pc, pr, rc, rr, lc, lr


def library(name, x, beta, hyper):
    """The library's losses (float64) and autograd gradients of sum(w * losses) for fixed random w."""
    pc, pr, rc, rr, lc, lr = (torch.tensor(v, dtype=torch.float64) for v in x)
    inputs = [t.requires_grad_() for t in (pc, pr, rc, rr)]
    spec = L.LOSSES[name]
    ref = inputs[2:] if spec.needs_reference else [None, None]
    losses, chosen_rewards, rejected_rewards = spec.fn(
        inputs[0], inputs[1], *ref, beta=beta, chosen_lengths=lc, rejected_lengths=lr, **hyper
    )
    w = torch.linspace(0.5, 1.5, len(losses), dtype=torch.float64)
    (w * losses).sum().backward()
    grads = [t.grad.numpy() if t.grad is not None else np.zeros(len(t)) for t in inputs]
    return losses.detach().numpy(), grads, w.numpy(), (chosen_rewards, rejected_rewards)


def finite_difference(f, x, w, step=1e-6):
    """d sum(w * f(x)) / d x_k for the four log-prob inputs, central differences."""
    grads = []
    for k in range(4):
        g = np.zeros(len(x[k]))
        for i in range(len(x[k])):
            up, down = [v.copy() for v in x], [v.copy() for v in x]
            up[k][i] += step
            down[k][i] -= step
            g[i] = ((w * f(*up)).sum() - (w * f(*down)).sum()) / (2 * step)
        grads.append(g)
    return grads


CASES = [(name, i) for name, (_, hypers) in REFERENCES.items() for i in range(len(hypers))]


def test_every_loss_has_a_reference():
    assert set(REFERENCES) == set(L.LOSSES)


@pytest.mark.parametrize("name,case", CASES)
@pytest.mark.parametrize("seed", [0, 1])
def test_loss_value_and_gradient_match_the_paper(name, case, seed):
    fn, hypers = REFERENCES[name]
    hyper, beta = hypers[case], [0.1, 0.5][seed]
    x = random_inputs(seed)
    got, grads, w, _ = library(name, x, beta, hyper)
    expected = fn(*x, beta=beta, **hyper)
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12)
    if name == "bco_pair" and "bco_delta" not in hyper:
        # delta, the batch's mean reward, is a detached statistic: a constant of the loss's gradient
        hyper = {"bco_delta": np.concatenate([beta * (x[0] - x[2]), beta * (x[1] - x[3])]).mean()}
    fd = finite_difference(lambda *v: fn(*v, beta=beta, **hyper), x, w)
    for k, (g, e) in enumerate(zip(grads, fd)):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-7, err_msg=f"{name}: d/d input {k}")


@pytest.mark.parametrize("name", [n for n, s in L.LOSSES.items() if s.needs_reference])
def test_rewards_are_beta_log_ratios_detached(name):
    x = random_inputs(3)
    _, _, _, (chosen, rejected) = library(name, x, 0.3, {})
    assert not chosen.requires_grad and not rejected.requires_grad
    np.testing.assert_allclose(chosen.numpy(), 0.3 * (x[0] - x[2]), rtol=1e-12)
    np.testing.assert_allclose(rejected.numpy(), 0.3 * (x[1] - x[3]), rtol=1e-12)


def test_dpo_gradient_is_the_papers_form():
    """grad L = -beta s(r_hat(y_l) - r_hat(y_w)) (grad log pi(y_w) - grad log pi(y_l)) (paper, Sec. 4), on a
    softmax policy over K responses, where grad_theta log pi(y) = e_y - pi analytically."""
    rng = np.random.default_rng(0)
    K, beta = 6, 0.4
    theta0, ref_logits = rng.normal(size=K), rng.normal(size=K)
    yw, yl = 1, 4
    theta = torch.tensor(theta0, requires_grad=True)
    logp = torch.log_softmax(theta, 0)
    ref_logp = torch.log_softmax(torch.tensor(ref_logits), 0)
    loss, _, _ = L.dpo_loss(logp[yw : yw + 1], logp[yl : yl + 1], ref_logp[yw : yw + 1], ref_logp[yl : yl + 1], beta)
    loss.sum().backward()
    pi = np.exp(theta0 - np.logaddexp.reduce(theta0))
    pi_ref = np.exp(ref_logits - np.logaddexp.reduce(ref_logits))
    r_hat = beta * (np.log(pi) - np.log(pi_ref))
    grad_log_pi = lambda y: np.eye(K)[y] - pi  # noqa: E731
    expected = -beta * sig(r_hat[yl] - r_hat[yw]) * (grad_log_pi(yw) - grad_log_pi(yl))
    np.testing.assert_allclose(theta.grad.numpy(), expected, rtol=1e-10, atol=1e-14)


def test_dpo_loss_keeps_its_positional_signature():
    x = [torch.tensor(v) for v in random_inputs(4)[:4]]
    by_position = L.dpo_loss(*x, 0.2, 0.1)[0]
    by_registry = L.LOSSES["sigmoid"](*x, beta=0.2, label_smoothing=0.1)[0]
    np.testing.assert_allclose(by_position.numpy(), np_sigmoid(*(v.numpy() for v in x), None, None, 0.2, 0.1))
    assert torch.equal(by_position, by_registry)


# --- combined_loss ------------------------------------------------------------------------------------------


def tensors(seed):
    pc, pr, rc, rr, lc, lr = (torch.tensor(v) for v in random_inputs(seed))
    return dict(
        policy_chosen_logps=pc,
        policy_rejected_logps=pr,
        reference_chosen_logps=rc,
        reference_rejected_logps=rr,
        chosen_lengths=lc,
        rejected_lengths=lr,
    )


def test_combined_loss_is_the_weighted_sum_with_the_first_losses_rewards():
    kw, x = tensors(5), random_inputs(5)
    total, chosen, rejected = L.combined_loss(
        ["sigmoid", "sft", "ipo"], [1.0, 0.3, 0.05], beta=0.2, label_smoothing=0.1, simpo_gamma=9.0, **kw
    )
    expected = np_sigmoid(*x, 0.2, 0.1) + 0.3 * np_sft(*x, 0.2) + 0.05 * np_ipo(*x, 0.2)
    np.testing.assert_allclose(total.numpy(), expected, rtol=1e-12)
    np.testing.assert_allclose(chosen.numpy(), 0.2 * (x[0] - x[2]), rtol=1e-12)  # sigmoid's rewards
    np.testing.assert_allclose(rejected.numpy(), 0.2 * (x[1] - x[3]), rtol=1e-12)
    # default weights 1, and a single name
    one = L.combined_loss("sigmoid", beta=0.2, **kw)[0]
    both = L.combined_loss(["sigmoid", "sft"], None, beta=0.2, **kw)[0]
    np.testing.assert_allclose(both.numpy(), one.numpy() + np_sft(*x, 0.2), rtol=1e-12)


def test_combined_loss_errors():
    kw = tensors(6)
    with pytest.raises(ValueError, match="unknown loss"):
        L.combined_loss(["sigmod"], beta=0.1, **kw)
    with pytest.raises(ValueError, match="weights"):
        L.combined_loss(["sigmoid", "sft"], [1.0], beta=0.1, **kw)
    with pytest.raises(TypeError, match="label_smoothin"):
        L.combined_loss(["sigmoid"], beta=0.1, label_smoothin=0.1, **kw)


def test_requirements():
    assert L.requirements(["sigmoid", "sft"]) == (True, True)
    assert L.requirements(["simpo"]) == (False, True)
    assert L.requirements(["sigmoid"], reference_free=True) == (False, False)
    assert L.requirements(["ipo"]) == (True, False)
    assert L.requirements(["ipo"], ipo_length_normalize=True) == (True, True)


# --- reference-free ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["simpo", "orpo", "sft"])
def test_reference_free_losses_never_read_the_reference(name):
    kw = tensors(7)
    kw.update(reference_chosen_logps=None, reference_rejected_logps=None)
    assert not L.LOSSES[name].needs_reference and L.LOSSES[name].needs_lengths
    losses, chosen, rejected = L.combined_loss([name], beta=0.5, **kw)
    x = random_inputs(7)
    np.testing.assert_allclose(losses.numpy(), REFERENCES[name][0](*x, beta=0.5), rtol=1e-12)
    np.testing.assert_allclose(chosen.numpy(), 0.5 * x[0] / x[4], rtol=1e-12)  # beta * average log-prob


@pytest.mark.parametrize("name", [n for n, s in L.LOSSES.items() if s.needs_reference])
def test_reference_free_is_a_uniform_reference(name):
    kw = tensors(8)
    zeros = torch.zeros_like(kw["policy_chosen_logps"])
    with_zeros = L.combined_loss(
        [name], beta=0.3, **{**kw, "reference_chosen_logps": zeros, "reference_rejected_logps": zeros}
    )
    free = L.combined_loss(
        [name],
        beta=0.3,
        reference_free=True,
        **{**kw, "reference_chosen_logps": None, "reference_rejected_logps": None},
    )
    for a, b in zip(with_zeros, free):
        assert torch.allclose(a, b, rtol=1e-12)
    with pytest.raises(ValueError, match="reference"):
        L.combined_loss([name], beta=0.3, **{**kw, "reference_chosen_logps": None})


def test_losses_that_need_lengths_say_so():
    kw = tensors(9)
    kw.pop("chosen_lengths")
    with pytest.raises(ValueError, match="chosen_lengths"):
        L.combined_loss(["simpo"], beta=2.0, **kw)


# --- numerics the naive formulas get wrong ------------------------------------------------------------


def test_discopop_is_finite_where_the_naive_product_is_nan():
    h = torch.tensor([-2000.0, -50.0, 0.0, 50.0], requires_grad=True)
    zero = torch.zeros(4)
    losses, _, _ = L.discopop_loss(h, zero, zero, zero, beta=1.0)
    losses.sum().backward()
    assert torch.isfinite(losses).all() and torch.isfinite(h.grad).all()
    np.testing.assert_allclose(
        losses[1:].detach().numpy(), np_discopop(h[1:].detach().double().numpy(), 0, 0, 0, None, None, 1.0), rtol=1e-5
    )


def test_orpo_log_odds_near_probability_one():
    from decimal import Decimal, getcontext

    getcontext().prec = 50
    xs = [-1e-7, -1e-3, -0.5, -30.0]
    exact = [float((1 - Decimal(x).exp()).ln()) for x in xs]  # log(1 - exp(x)) to 50 digits
    np.testing.assert_allclose(L.log1mexp(torch.tensor(xs, dtype=torch.float64)).numpy(), exact, rtol=1e-12)


def test_exo_zero_label_smoothing_means_the_default():
    x = [torch.tensor(v) for v in random_inputs(10)[:4]]
    zero = L.exo_pair_loss(*x, beta=0.1, label_smoothing=0.0)[0]
    np.testing.assert_allclose(zero.numpy(), np_exo_pair(*(v.numpy() for v in x), None, None, 0.1, 1e-3))


# --- BCO's running mean ----------------------------------------------------------------------------------


def test_reward_mean_is_the_mean_of_everything_seen():
    rng = np.random.default_rng(11)
    chunks = [rng.normal(size=n) for n in (4, 10, 1, 7)]
    state = L.RewardMean()
    for c in chunks:
        delta = state.update(torch.tensor(c))
    assert math.isclose(delta, np.concatenate(chunks).mean(), rel_tol=1e-12)
    resumed = L.RewardMean()
    resumed.load_state_dict(state.state_dict())
    assert resumed.update(torch.tensor([1.0])) == state.update(torch.tensor([1.0]))


# --- KTO ------------------------------------------------------------------------------------------------


def np_kto(policy, reference, labels, z0, beta, lam_d, lam_u):  # KTO Eq. 8: lambda_y - v(x, y)
    r = policy - reference
    v = np.where(labels, lam_d * sig(beta * (r - z0)), lam_u * sig(beta * (z0 - r)))
    return np.where(labels, lam_d, lam_u) - v


def test_kto_loss_and_gradient():
    rng = np.random.default_rng(12)
    B, beta, lam_d, lam_u = 9, 0.2, 1.0, 1.33
    policy, reference = -rng.uniform(5, 40, B), None
    reference = policy + rng.normal(0, 3, B)
    labels = rng.random(B) < 0.5
    kl_policy, kl_reference = -rng.uniform(5, 40, B), None
    kl_reference = kl_policy - rng.normal(0.5, 1.0, B)
    z0 = max(0.0, (kl_policy - kl_reference).mean())

    p = torch.tensor(policy, requires_grad=True)
    kl_p = torch.tensor(kl_policy, requires_grad=True)
    z = L.kto_reference_point(kl_p, torch.tensor(kl_reference))
    assert z.dim() == 0 and not z.requires_grad and math.isclose(z.item(), z0, rel_tol=1e-12)
    losses, rewards = L.kto_loss(p, torch.tensor(reference), torch.tensor(labels), z, beta, lam_d, lam_u)
    np.testing.assert_allclose(
        losses.detach().numpy(), np_kto(policy, reference, labels, z0, beta, lam_d, lam_u), rtol=1e-12
    )
    np.testing.assert_allclose(rewards.numpy(), beta * (policy - reference), rtol=1e-12)
    losses.sum().backward()
    fd = np.array(
        [
            (
                np_kto(policy + 1e-6 * e, reference, labels, z0, beta, lam_d, lam_u).sum()
                - np_kto(policy - 1e-6 * e, reference, labels, z0, beta, lam_d, lam_u).sum()
            )
            / 2e-6
            for e in np.eye(B)
        ]
    )
    np.testing.assert_allclose(p.grad.numpy(), fd, rtol=1e-5, atol=1e-9)
    assert kl_p.grad is None  # z0 is a constant of the loss


def test_kto_reference_point_is_clamped_at_zero():
    assert L.kto_reference_point(torch.tensor([-3.0, -4.0]), torch.tensor([-1.0, -1.0])).item() == 0.0


# --- TR-DPO --------------------------------------------------------------------------------------------


def test_soft_update_reference():
    torch.manual_seed(0)
    policy, reference = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    before = {k: v.detach().clone() for k, v in reference.state_dict().items()}
    pol = {k: v.detach().clone() for k, v in policy.state_dict().items()}
    L.soft_update_reference(reference, policy, 0.3)
    for k, v in reference.state_dict().items():
        assert torch.allclose(v, 0.3 * pol[k] + 0.7 * before[k], atol=1e-7)
        assert torch.equal(policy.state_dict()[k], pol[k])  # the policy is untouched
    assert all(p.grad is None and p.grad_fn is None for p in reference.parameters())
    L.soft_update_reference(reference, policy, 1.0)  # hard update: a copy
    for k, v in reference.state_dict().items():
        assert torch.equal(v, pol[k])
    with pytest.raises(ValueError):
        L.soft_update_reference(torch.nn.Linear(3, 2, bias=False), policy, 0.5)
