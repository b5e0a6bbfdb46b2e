"""ranking_losses.py against independent computations: the DPO paper's appendix formula written out in
float64 loops over the ranking (value and gradient), DPO's loss for K = 2, and pairs split by hand."""

import itertools
import math

import pytest
import torch

from dpokit.losses import LOSSES, dpo_loss
from dpokit.ranking_losses import (
    pairs_from_ranking,
    plackett_luce_loss,
    ranked_pair_losses,
    ranking_accuracy,
)


def appendix_formula(pi, ref, order, beta):
    """-log prod_k exp(beta lr(y_tau(k))) / sum_{j>=k} exp(beta lr(y_tau(j))) for one list, in float64
    scalars (arXiv 2305.18290, Appendix A.3): `order` lists response indices best first."""
    lr = [beta * (pi[i] - ref[i]) for i in order]
    total = 0.0
    for k in range(len(lr)):
        total += lr[k] - math.log(sum(math.exp(v) for v in lr[k:]))
    return -total


def breslow_formula(pi, ref, ranks, beta):
    """Ties: response i is chosen from all responses ranked no better than it (Breslow), float64 loops."""
    z = [beta * (p - r) for p, r in zip(pi, ref)]
    n = len(z)
    return -sum(z[i] - math.log(sum(math.exp(z[j]) for j in range(n) if ranks[j] >= ranks[i])) for i in range(n))


def numeric_grad(f, x, eps=1e-6):
    """Central differences of a scalar function of a list of floats."""
    out = []
    for i in range(len(x)):
        up, down = list(x), list(x)
        up[i] += eps
        down[i] -= eps
        out.append((f(up) - f(down)) / (2 * eps))
    return out


@pytest.mark.parametrize("K", [2, 3, 4, 6])
def test_plackett_luce_equals_appendix_formula_value_and_gradient(K):
    g = torch.Generator().manual_seed(K)
    B, beta = 5, 0.7
    pi = (torch.randn(B, K, generator=g, dtype=torch.float64) * 3).requires_grad_()
    ref = torch.randn(B, K, generator=g, dtype=torch.float64) * 3
    ranks = torch.stack([torch.randperm(K, generator=g) for _ in range(B)])  # response k's rank, 0 = best
    losses, rewards = plackett_luce_loss(pi, ref, ranks, beta)
    losses.sum().backward()
    for b in range(B):
        order = sorted(range(K), key=lambda k: int(ranks[b, k]))  # best first
        p, r = pi[b].tolist(), ref[b].tolist()
        assert losses[b].item() == pytest.approx(appendix_formula(p, r, order, beta), abs=1e-12)
        grad = numeric_grad(lambda x, r=r, order=order: appendix_formula(x, r, order, beta), p)
        assert pi.grad[b].tolist() == pytest.approx(grad, abs=1e-7)
    assert torch.allclose(rewards, beta * (pi - ref).detach())


def test_k2_is_dpo_exactly():
    """Plackett-Luce on two responses is DPO's -log s(beta h), in value and gradient."""
    g = torch.Generator().manual_seed(0)
    pi = (torch.randn(16, 2, generator=g, dtype=torch.float64) * 4).requires_grad_()
    ref = torch.randn(16, 2, generator=g, dtype=torch.float64) * 4
    ranks = torch.tensor([[0, 1]] * 16)
    pl, _ = plackett_luce_loss(pi, ref, ranks, beta=0.3)
    (grad_pl,) = torch.autograd.grad(pl.sum(), pi)
    dpo, _, _ = dpo_loss(pi[:, 0], pi[:, 1], ref[:, 0], ref[:, 1], beta=0.3)
    (grad_dpo,) = torch.autograd.grad(dpo.sum(), pi)
    assert torch.allclose(pl, dpo, atol=1e-14, rtol=0)
    assert torch.allclose(grad_pl, grad_dpo, atol=1e-14, rtol=0)
    # swapped ranks: the second response preferred
    pl_swapped, _ = plackett_luce_loss(pi, ref, torch.tensor([[1, 0]] * 16), beta=0.3)
    assert torch.allclose(pl_swapped, dpo_loss(pi[:, 1], pi[:, 0], ref[:, 1], ref[:, 0], beta=0.3)[0])


def test_ties_follow_breslow_and_padding_is_inert():
    """Lists of different K in one batch (padded with rank -1), some with ties: each equals its own
    float64 Breslow formula; padding values change nothing and get no gradient."""
    beta = 0.5
    lists = [([0.3, -1.2, 2.0, 0.1], [0.0, 0.4, -0.3, 1.0], [0, 1, 1, 2]), ([1.0, 2.0], [0.5, -0.5], [1, 0])]
    lists.append(([0.2, 0.9, -0.7], [0.1, 0.1, 0.1], [0, 0, 1]))
    K = 4
    pi = torch.full((3, K), 123.0, dtype=torch.float64)  # padding slots hold garbage
    ref = torch.full((3, K), -55.0, dtype=torch.float64)
    ranks = torch.full((3, K), -1)
    for b, (p, r, rk) in enumerate(lists):
        pi[b, : len(p)], ref[b, : len(r)] = torch.tensor(p, dtype=torch.float64), torch.tensor(r, dtype=torch.float64)
        ranks[b, : len(rk)] = torch.tensor(rk)
    pi.requires_grad_()
    losses, _ = plackett_luce_loss(pi, ref, ranks, beta)
    losses.sum().backward()
    for b, (p, r, rk) in enumerate(lists):
        assert losses[b].item() == pytest.approx(breslow_formula(p, r, rk, beta), abs=1e-12)
        grad = numeric_grad(lambda x, r=r, rk=rk: breslow_formula(x, r, rk, beta), p)
        assert pi.grad[b, : len(p)].tolist() == pytest.approx(grad, abs=1e-7)
        assert (pi.grad[b, len(p) :] == 0).all()
    # without ties the Breslow form is the appendix formula (a check of the checker)
    assert breslow_formula([1.0, 0.0, 2.0], [0, 0, 0], [2, 0, 1], 1.0) == pytest.approx(
        appendix_formula([1.0, 0.0, 2.0], [0, 0, 0], [1, 2, 0], 1.0)
    )


def test_plackett_luce_reference_free():
    pi = torch.randn(3, 3, dtype=torch.float64)
    ranks = torch.tensor([[2, 0, 1]] * 3)
    free, _ = plackett_luce_loss(pi, None, ranks, 1.0, reference_free=True)
    zero_ref, _ = plackett_luce_loss(pi, torch.zeros_like(pi), ranks, 1.0)
    assert torch.equal(free, zero_ref)


def test_pairs_from_ranking_modes():
    ranks = torch.tensor([[2, 0, 1, 3], [1, 0, -1, -1], [0, 1, 1, -1]])  # list 2: a tie for worst

    def pairs(mode):
        return sorted(zip(*(t.tolist() for t in pairs_from_ranking(ranks, mode))))

    assert pairs("all_pairs") == sorted(
        [(0, 1, 0), (0, 1, 2), (0, 1, 3), (0, 2, 0), (0, 2, 3), (0, 0, 3), (1, 1, 0), (2, 0, 1), (2, 0, 2)]
    )
    assert pairs("best_vs_rest") == sorted([(0, 1, 0), (0, 1, 2), (0, 1, 3), (1, 1, 0), (2, 0, 1), (2, 0, 2)])
    assert pairs("best_vs_worst") == sorted([(0, 1, 3), (1, 1, 0), (2, 0, 1), (2, 0, 2)])
    # all pairs of a K-list without ties: K (K - 1) / 2
    perm = torch.stack([torch.randperm(5) for _ in range(4)])
    assert len(pairs_from_ranking(perm, "all_pairs")[0]) == 4 * 10
    with pytest.raises(ValueError):
        pairs_from_ranking(ranks, "top_k")


@pytest.mark.parametrize("mode", ["all_pairs", "best_vs_rest", "best_vs_worst"])
@pytest.mark.parametrize("loss_type", sorted(LOSSES))
def test_ranked_pair_losses_equal_the_pairs_split_by_hand(mode, loss_type):
    """Every pairwise loss on a ranking = the sum of the loss over the pairs written out with itertools."""
    g = torch.Generator().manual_seed(1)
    B, K = 3, 4
    pi = torch.randn(B, K, generator=g, dtype=torch.float64) * 2 - 20
    ref = torch.randn(B, K, generator=g, dtype=torch.float64) * 2 - 20
    lengths = torch.randint(3, 30, (B, K), generator=g).double()
    ranks = torch.stack([torch.randperm(K, generator=g) for _ in range(B)])
    losses, _, _, _ = ranked_pair_losses([loss_type], None, pi, ref, ranks, mode, lengths=lengths, beta=0.4)
    spec = LOSSES[loss_type]
    for b in range(B):
        order = sorted(range(K), key=lambda k: int(ranks[b, k]))
        if mode == "all_pairs":
            split = list(itertools.combinations(order, 2))
        elif mode == "best_vs_rest":
            split = [(order[0], o) for o in order[1:]]
        else:
            split = [(order[0], order[-1])]
        w, l = torch.tensor([s[0] for s in split]), torch.tensor([s[1] for s in split])
        extra = {"chosen_lengths": lengths[b, w], "rejected_lengths": lengths[b, l]} if spec.needs_lengths else {}
        expected = spec(pi[b, w], pi[b, l], ref[b, w], ref[b, l], beta=0.4, **extra)[0].sum()
        if loss_type in ("aot", "aot_pair", "bco_pair"):  # batch-coupled losses: same pairs, other batch
            continue
        assert losses[b].item() == pytest.approx(expected.item(), rel=1e-10, abs=1e-12)


def test_ranking_accuracy():
    rewards = torch.tensor([[3.0, 1.0, 2.0], [0.0, 0.0, 1.0]])
    ranks = torch.tensor([[0, 1, 2], [0, 1, -1]])
    # list 0: pairs (0>1 right), (0>2 right), (1>2 wrong) -> 2/3; list 1: a tie in reward -> 1/2
    assert ranking_accuracy(rewards, ranks).tolist() == pytest.approx([2 / 3, 0.5])
