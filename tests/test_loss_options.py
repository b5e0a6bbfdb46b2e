"""The DPO loss options TRL users turn on, each against an independent float64 re-implementation written
from its paper (values and gradients): f-DPO (f_divergence_type), sigmoid_norm, LD-DPO (ld_alpha), WPO
(use_weighting), RPO (rpo_alpha); the per-token pieces of logprobs.py they read, against a direct
computation on the padded path in every layout; and one short `dpokit.dpo` run per option."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import run_dpo
from test_layouts import SETTINGS, UNEVEN, random_pairs, tiny_llama

from dpokit import losses as L
from dpokit.commands.dpo import DPOConfig
from dpokit.data.batch import collate_padded
from dpokit.data.layouts import collate_for
from dpokit.errors import UserError
from dpokit.logprobs import response_logps
from dpokit.train.dpo_step import DPOStep

# --- the papers' formulas, in numpy ------------------------------------------------------------------------


def logsig(x):
    return -np.logaddexp(0.0, -x)


def f_prime(u, kind, alpha):
    """f'(u) of f-DPO's Table 1 (arXiv 2309.16240), written on u = pi/pi_ref itself."""
    if kind == "reverse_kl":  # f(u) = u log u
        return np.log(u) + 1
    if kind == "forward_kl":  # f(u) = -log u
        return -1 / u
    if kind == "js_divergence":  # f(u) = u log u - (u + 1) log((u + 1) / 2)
        return np.log(2 * u / (1 + u))
    if kind == "alpha_divergence":  # f(u) = (u^(1-alpha) - (1-alpha) u - alpha) / (alpha (alpha - 1))
        return (1 - u ** (-alpha)) / alpha
    raise AssertionError(kind)


def np_f_dpo(pc, pr, rc, rr, beta, kind, alpha, eps):
    uw, ul = np.exp(pc - rc), np.exp(pr - rr)
    z = beta * (f_prime(uw, kind, alpha) - f_prime(ul, kind, alpha))
    return -(1 - eps) * logsig(z) - eps * logsig(-z)


def np_sigmoid_norm(pc, pr, rc, rr, lc, lr, beta, eps):
    z = beta * ((pc - rc) / lc - (pr - rr) / lr)
    return -(1 - eps) * logsig(z) - eps * logsig(-z)


def finite_difference(f, xs, step=1e-6):
    """d sum f(xs) / d x for each array of xs, central differences."""
    grads = []
    for k in range(len(xs)):
        g = np.zeros_like(xs[k])
        for i in np.ndindex(xs[k].shape):
            up, down = [v.copy() for v in xs], [v.copy() for v in xs]
            up[k][i] += step
            down[k][i] -= step
            g[i] = (f(*up).sum() - f(*down).sum()) / (2 * step)
        grads.append(g)
    return grads


def torch_grads(fn, xs):
    ts = [torch.tensor(x, dtype=torch.float64, requires_grad=True) for x in xs]
    out = fn(*ts)
    out.sum().backward()
    return out.detach().numpy(), [t.grad.numpy() for t in ts]


def random_logps(B=6, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.normal(-20, 4, B) for _ in range(4)]


# --- f-DPO --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", L.F_DIVERGENCES)
@pytest.mark.parametrize("alpha,eps", [(0.5, 0.0), (1.0, 0.1), (0.3, 0.0)])
def test_f_dpo_against_the_paper(kind, alpha, eps):
    x = random_logps()
    x[2], x[3] = x[0] + np.random.default_rng(1).normal(0, 1, 6), x[1] + np.random.default_rng(2).normal(0, 1, 6)
    beta = 0.3

    def lib(pc, pr, rc, rr):
        return L.LOSSES["sigmoid"](
            pc, pr, rc, rr, beta=beta, label_smoothing=eps, f_divergence_type=kind, f_alpha_divergence_coef=alpha
        )[0]

    def ref(pc, pr, rc, rr):
        return np_f_dpo(pc, pr, rc, rr, beta, kind, alpha, eps)

    value, grads = torch_grads(lib, x)
    assert np.allclose(value, ref(*x), rtol=1e-10, atol=1e-12)
    for got, want in zip(grads, finite_difference(ref, x)):
        assert np.allclose(got, want, rtol=1e-5, atol=1e-8)


def test_f_dpo_special_cases():
    a, b = torch.randn(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    fwd = L.f_divergence_margin(a, b, "forward_kl")
    assert torch.allclose(fwd, L.f_divergence_margin(a, b, "alpha_divergence", 1.0))  # forward KL = alpha 1
    small = L.f_divergence_margin(a, b, "alpha_divergence", 1e-7)  # alpha -> 0: reverse KL (DPO)
    assert torch.allclose(small, a - b, atol=1e-5)
    far = L.f_divergence_margin(torch.zeros(1), torch.tensor([-200.0]), "forward_kl")  # u_l = e^-200: capped
    assert torch.isfinite(far).all()
    with pytest.raises(ValueError):
        L.f_divergence_margin(a, b, "hellinger")


# --- sigmoid_norm -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_sigmoid_norm_against_its_formula(eps):
    x = random_logps(seed=3)
    lc, lr = np.array([3.0, 7, 1, 12, 5, 9]), np.array([4.0, 2, 8, 12, 1, 6])
    beta = 2.0

    def lib(pc, pr, rc, rr):
        return L.combined_loss(
            ["sigmoid_norm"],
            None,
            pc,
            pr,
            rc,
            rr,
            beta=beta,
            label_smoothing=eps,
            chosen_lengths=torch.tensor(lc),
            rejected_lengths=torch.tensor(lr),
        )[0]

    def ref(pc, pr, rc, rr):
        return np_sigmoid_norm(pc, pr, rc, rr, lc, lr, beta, eps)

    value, grads = torch_grads(lib, x)
    assert np.allclose(value, ref(*x), rtol=1e-10)
    for got, want in zip(grads, finite_difference(ref, x)):
        assert np.allclose(got, want, rtol=1e-5, atol=1e-8)
    spec = L.LOSSES["sigmoid_norm"]
    assert spec.needs_reference and spec.needs_lengths


# --- LD-DPO ---------------------------------------------------------------------------------------------------


def np_ld_logp(token_lp, n, public, alpha):  # the paper's decomposed likelihood, token by token
    return sum(token_lp[t] * (1.0 if t < public else alpha) for t in range(n))


@pytest.mark.parametrize("alpha", [0.0, 0.4, 1.0])
def test_ld_dpo_against_the_paper(alpha):
    """Per-token log-probs of policy and reference (padded (2B, T) arrays), uneven lengths: the loss and its
    gradient with respect to every token log-prob."""
    rng = np.random.default_rng(4)
    n = np.array([3, 6, 1, 5, 5, 2])  # chosen lengths of 3 pairs, then rejected
    B, T = 3, 6
    pol, ref = rng.normal(-2, 1, (2 * B, T)), rng.normal(-2, 1, (2 * B, T))
    beta = 0.5
    seq = np.repeat(np.arange(2 * B), n)
    step = np.concatenate([np.arange(k) for k in n])

    def np_loss(pol, ref):
        public = np.minimum(n[:B], n[B:])
        lp = [np_ld_logp(pol[i], n[i], public[i % B], alpha) for i in range(2 * B)]
        lr = [np_ld_logp(ref[i], n[i], public[i % B], alpha) for i in range(2 * B)]
        h = (lp[i] - lr[i] - lp[B + i] + lr[B + i] for i in range(B))
        return np.array([-logsig(beta * x) for x in h])

    def lib(pol, ref):
        from dpokit.logprobs import ResponseLogps

        out = []
        for tokens in (pol, ref):
            r = ResponseLogps(tokens[seq, step], torch.tensor(seq), torch.tensor(step), 2 * B)
            k = r.lengths()
            out.append(L.length_desensitized_logps(*r.split_sums(torch.minimum(k[:B], k[B:]).repeat(2)), alpha))
        (p, r) = out
        return L.dpo_loss(p[:B], p[B:], r[:B], r[B:], beta=beta)[0]

    value, grads = torch_grads(lib, [pol, ref])
    assert np.allclose(value, np_loss(pol, ref), rtol=1e-6)  # the sums are accumulated in fp32
    for got, want in zip(grads, finite_difference(np_loss, [pol, ref])):
        assert np.allclose(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("layout,chunk", SETTINGS)
def test_split_sums_match_the_padded_logits(layout, chunk):
    """Every layout's split sums against the first-k / rest sums of a direct log_softmax on padded logits."""
    model = tiny_llama().eval()
    pairs = random_pairs(UNEVEN)
    padded = collate_padded(pairs, 0)
    k = torch.tensor([2, 1, 3, 0, 5, 1, 4, 9])  # cuts inside, at 0 and past the end of a response
    with torch.no_grad():
        logits = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits.double()
        lp = logits[:, :-1].log_softmax(-1).gather(-1, padded["input_ids"][:, 1:, None])[..., 0]  # (2B, T-1)
        mask = padded["loss_mask"][:, 1:].bool()
        t = mask.cumsum(-1) - 1  # step within the response
        front = (lp * (mask & (t < k[:, None]))).sum(-1)
        rear = (lp * (mask & (t >= k[:, None]))).sum(-1)
        got = response_logps(model, collate_for(layout, 0)(pairs), chunk_size=chunk).split_sums(k)
    assert torch.allclose(got[0].double(), front, atol=1e-4)
    assert torch.allclose(got[1].double(), rear, atol=1e-4)


# --- WPO ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["padded", "packed", "prefix_shared", "prefix_shared_packed"])
def test_wpo_weights_against_the_paper(layout):
    """w(x, y) = exp((1/|y|) sum_t log(p(y_t) / sum_v p(v)^2)), from float64 probabilities of the padded
    forward, against the library's in every layout (no chunking: it refuses)."""
    model = tiny_llama(seed=2).eval()
    pairs = random_pairs(UNEVEN)
    padded = collate_padded(pairs, 0)
    with torch.no_grad():
        logits = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits.double()
    p = logits[:, :-1].softmax(-1).numpy()  # (2B, T-1, V)
    ids, mask = padded["input_ids"][:, 1:].numpy(), padded["loss_mask"][:, 1:].bool().numpy()
    expected = []
    for i in range(len(ids)):
        ts = np.nonzero(mask[i])[0]
        expected.append(np.exp(np.mean([np.log(p[i, t, ids[i, t]] / (p[i, t] ** 2).sum()) for t in ts])))
    expected = np.array(expected)
    B = len(pairs)
    r = response_logps(model, collate_for(layout, 0)(pairs), wpo=True)
    log_w = r.wpo_log_weights()
    assert not log_w.requires_grad
    assert np.allclose(log_w.exp().double().numpy(), expected, rtol=1e-5)
    pair_w = L.wpo_weights(log_w[:B], log_w[B:])
    assert np.allclose(pair_w.double().numpy(), expected[:B] * expected[B:], rtol=1e-5)
    with pytest.raises(UserError, match="use_weighting"):
        response_logps(model, collate_for(layout, 0)(pairs), chunk_size=5, wpo=True)


def step_config(**kw):
    return DPOConfig(**{"model": "unused", "dataset": "unused", **kw})


def step_losses_and_grads(cfg, policy, reference, batch):
    policy.zero_grad()
    losses, metrics = DPOStep(reference, cfg)(policy, batch)
    losses.sum().backward()
    return losses.detach(), [p.grad.clone() for p in policy.parameters()], metrics


def test_wpo_step_scales_each_pair_by_its_constant_weight():
    """The weighted step's loss and gradient are w * (the plain step's), with w no function of theta:
    grad(w L) = w grad L, as in the paper's Eq. 3 (the weight is a sampling correction, not an objective)."""
    policy, reference = tiny_llama(seed=3), tiny_llama(seed=4).eval()
    batch = collate_padded(random_pairs(UNEVEN), 0)
    B = len(UNEVEN)
    plain, _, _ = step_losses_and_grads(step_config(), policy, reference, batch)
    weighted, grads, metrics = step_losses_and_grads(step_config(use_weighting=True), policy, reference, batch)
    w = metrics["wpo/weights"]
    assert w.shape == (B,) and (w > 0).all()
    assert torch.allclose(weighted, w * plain, rtol=1e-6)
    # the gradient of sum_i w_i L_i, pair by pair: sum_i w_i grad L_i
    expected = [torch.zeros_like(p) for p in policy.parameters()]
    for i in range(B):
        policy.zero_grad()
        losses, _ = DPOStep(reference, step_config())(policy, batch)
        losses[i].backward()
        expected = [e + w[i] * p.grad for e, p in zip(expected, policy.parameters())]
    for got, want in zip(grads, expected):
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-7)


# --- RPO ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss_weights", [None, [0.7]])
def test_rpo_alpha_is_sigmoid_plus_alpha_sft(loss_weights):
    policy, reference = tiny_llama(seed=5), tiny_llama(seed=6).eval()
    batch = collate_padded(random_pairs(UNEVEN), 0)
    alpha = 0.6
    w = loss_weights or [1.0]
    rpo, rpo_grads, _ = step_losses_and_grads(
        step_config(rpo_alpha=alpha, loss_weights=loss_weights), policy, reference, batch
    )
    both, both_grads, _ = step_losses_and_grads(
        step_config(loss_type=["sigmoid", "sft"], loss_weights=w + [alpha]), policy, reference, batch
    )
    assert torch.equal(rpo, both)
    for a, b in zip(rpo_grads, both_grads):
        assert torch.equal(a, b)
    # and the paper's Eq. 1 by hand: DPO + alpha * (-log pi(y_w) / |y_w|)
    r = response_logps(policy, batch)
    p, n = r.sums().detach(), r.lengths()
    with torch.no_grad():
        q = response_logps(reference, batch).sums()
    B = len(UNEVEN)
    dpo = -F.logsigmoid(0.1 * ((p[:B] - q[:B]) - (p[B:] - q[B:])))
    assert torch.allclose(rpo, w[0] * dpo + alpha * -p[:B] / n[:B], rtol=1e-5)


# --- the config -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw,key",
    [
        (dict(f_alpha_divergence_coef=0.0), "f_alpha_divergence_coef"),
        (dict(f_divergence_type="js_divergence", loss_type=["ipo"]), "f_divergence_type"),
        (dict(ld_alpha=1.5), "ld_alpha"),
        (dict(ld_alpha=0.5, loss_type=["simpo"]), "ld_alpha"),
        (dict(ld_alpha=0.5, rpo_alpha=1.0), "ld_alpha"),
        (dict(ld_alpha=0.5, precompute_ref_log_probs=True), "ld_alpha"),
        (dict(rpo_alpha=-1.0), "rpo_alpha"),
        (dict(use_weighting=True, logprob_chunk_size=64), "use_weighting"),
        (dict(use_weighting=True, loss_type=["kto"]), "use_weighting"),
    ],
)
def test_config_refusals(kw, key):
    with pytest.raises(UserError, match=key):
        step_config(**kw).check()


# --- end to end: dpokit.dpo on the tiny model, one run per option ---------------------------------------------


@pytest.mark.parametrize(
    "kw",
    [
        dict(use_weighting=True),
        dict(ld_alpha=0.5),
        dict(f_divergence_type="js_divergence"),
        dict(f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.5),
        dict(loss_type=["sigmoid_norm"]),
        dict(rpo_alpha=0.5),
    ],
    ids=["wpo", "ld", "js", "alpha", "sigmoid_norm", "rpo"],
)
def test_dpo_runs_with_each_option(tiny_model_dir, pref_dir, tmp_path, kw):
    run_dpo(tiny_model_dir, pref_dir, tmp_path / "o", **kw)
    rows = [json.loads(x) for x in (tmp_path / "o" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "loss" in r]
    assert train and all(np.isfinite(r["loss"]) for r in train)
    assert any("eval/loss" in r and np.isfinite(r["eval/loss"]) for r in rows)
    if kw.get("use_weighting"):
        assert "wpo/weights" in train[0]
