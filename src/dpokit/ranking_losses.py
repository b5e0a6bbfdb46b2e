"""Preference losses on rankings of K responses: Plackett-Luce DPO, and rankings turned into pairs for the
pairwise losses of losses.py. Pure functions of per-response log-probs, like losses.py.

A batch of B ranked lists is held as (B, K) tensors, K the longest list of the batch:

    policy_logps, reference_logps   (B, K) log pi(y_k|x), log pi_ref(y_k|x): sums over response tokens
    ranks                           (B, K) long: 0 for the best response, 1 for the next, ...; responses
                                    that tie share a rank; -1 where a shorter list has no response k

Plackett-Luce DPO (Rafailov et al. 2023, arXiv 2305.18290, Appendix A.3, Eq. 24 with the reward
beta log pi/pi_ref of Eq. 5): with z_k = beta log pi(y_k|x)/pi_ref(y_k|x) and tau the ranking (tau(1) the
best),

    L = - sum_{k=1..K} [ z_tau(k) - log sum_{j=k..K} exp z_tau(j) ]

the negative log-likelihood of the observed ranking under a Plackett-Luce model whose scores are the
implicit rewards: the best response is chosen from all K, the next from the K-1 left, and so on. For
K = 2 it is -log s(z_1 - z_2), DPO's loss. Ties (Breslow, 1974, the tie rule of Cox's partial likelihood):
every response of a tied group is chosen from the same set, the group and everything ranked below it, so

    L = - sum_{i} [ z_i - log sum_{j: rank_j >= rank_i} exp z_j ]

which is the formula above when no two ranks tie. A list whose responses all tie says nothing about
which is better and is dropped when the data is read (data/rankings.py).

`pairs_from_ranking` turns rankings into (winner, loser) index pairs for the pairwise losses; a list's
loss is then the sum of its pairs' losses (as Plackett-Luce's is a sum of its K - 1 choices). See
docs/losses.md for when to use which mode.
"""

import torch

from dpokit.losses import combined_loss

PAIRS_FROM_RANKING = ("all_pairs", "best_vs_rest", "best_vs_worst")


def implicit_rewards(policy_logps, reference_logps, beta: float, reference_free: bool = False):
    """z = beta log pi/pi_ref, (B, K) (reference_free: log pi_ref = 0)."""
    if reference_free or reference_logps is None:
        return beta * policy_logps
    return beta * (policy_logps - reference_logps)


def choice_sets(ranks: torch.Tensor) -> torch.Tensor:
    """(B, K) ranks -> (B, K, K) bool, [b, i, j] = response j is in the set response i is chosen from: every
    response ranked as well as i or worse (rank_j >= rank_i). A padding slot i (rank -1) gets {i} alone, so
    its term z_i - log exp z_i is exactly 0 with a zero gradient (an empty set would be -inf, and NaN in
    the backward)."""
    valid = ranks >= 0  # (B, K)
    later = (ranks[:, None, :] >= ranks[:, :, None]) & valid[:, None, :] & valid[:, :, None]  # (B, K, K)
    eye = torch.eye(ranks.shape[1], dtype=torch.bool, device=ranks.device)
    return later | (eye & ~valid[:, :, None])


def plackett_luce_loss(policy_logps, reference_logps, ranks, beta: float, reference_free: bool = False):
    """Plackett-Luce DPO (module docstring): policy_logps, reference_logps (B, K) (reference None with
    reference_free), ranks (B, K) long -> (losses (B,), rewards (B, K) = z detached, 0 at padding)."""
    valid = ranks >= 0  # (B, K)
    z = implicit_rewards(policy_logps, reference_logps, beta, reference_free)
    z = torch.where(valid, z, torch.zeros_like(z))  # padding slots: finite, and cut off from the graph
    pool = z[:, None, :].expand(-1, z.shape[1], -1).masked_fill(~choice_sets(ranks), float("-inf"))  # (B, K, K)
    choices = z - pool.logsumexp(-1)  # (B, K): log P(response i chosen from its set)
    return -choices.sum(-1), z.detach()


def pairs_from_ranking(ranks: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, K) ranks -> (list, winner, loser), each (P,): the pairs of responses of each list that `mode`
    keeps, the winner ranked strictly better than the loser (tied responses make no pair).

    all_pairs      every two responses of different rank: K (K - 1) / 2 pairs without ties
    best_vs_rest   the best response against each of the others: K - 1 pairs
    best_vs_worst  the best against the worst: 1 pair
    (With a tie for best or for worst, each tied response makes its own pairs.)"""
    if mode not in PAIRS_FROM_RANKING:
        raise ValueError(f"unknown pairs_from_ranking {mode!r} (valid: {', '.join(PAIRS_FROM_RANKING)})")
    valid = ranks >= 0
    better = (ranks[:, :, None] < ranks[:, None, :]) & valid[:, :, None] & valid[:, None, :]  # (B, K, K) [b, w, l]
    if mode in ("best_vs_rest", "best_vs_worst"):
        better &= (ranks == 0)[:, :, None]  # winners: the best group only
    if mode == "best_vs_worst":
        worst = ranks.max(-1, keepdim=True).values  # (B, 1)
        better &= (ranks == worst)[:, None, :]
    lists, winners, losers = better.nonzero(as_tuple=True)
    return lists, winners, losers


def ranked_pair_losses(
    loss_types,
    loss_weights,
    policy_logps,
    reference_logps,
    ranks,
    mode: str,
    *,
    lengths=None,
    **kwargs,
):
    """A pairwise loss (or weighted sum, losses.combined_loss) on the pairs `pairs_from_ranking(ranks, mode)`
    keeps: policy_logps, reference_logps (or None), lengths (or None) (B, K). Returns (losses (B,): each
    list's sum over its pairs, chosen_rewards (P,), rejected_rewards (P,), lists (P,))."""
    lists, w, l = pairs_from_ranking(ranks, mode)
    ref_w = ref_l = None
    if reference_logps is not None:
        ref_w, ref_l = reference_logps[lists, w], reference_logps[lists, l]
    if lengths is not None:
        kwargs.update(chosen_lengths=lengths[lists, w], rejected_lengths=lengths[lists, l])
    pair_losses, chosen_rewards, rejected_rewards = combined_loss(
        loss_types, loss_weights, policy_logps[lists, w], policy_logps[lists, l], ref_w, ref_l, **kwargs
    )
    losses = torch.zeros(ranks.shape[0], dtype=pair_losses.dtype, device=pair_losses.device)
    return losses.index_add(0, lists.to(losses.device), pair_losses), chosen_rewards, rejected_rewards, lists


def ranking_accuracy(rewards: torch.Tensor, ranks: torch.Tensor) -> torch.Tensor:
    """(B, K) rewards, ranks -> (B,) the fraction of a list's strictly ordered pairs that the rewards order
    the same way, a tie in reward counting 1/2 (as losses.preference_accuracy); K = 2: the pair accuracy."""
    lists, w, l = pairs_from_ranking(ranks, "all_pairs")
    margin = rewards[lists, w] - rewards[lists, l]
    right = (margin > 0).float() + 0.5 * (margin == 0).float()  # (P,)
    B = ranks.shape[0]
    hits = torch.zeros(B, device=rewards.device).index_add(0, lists, right)
    pairs = torch.zeros(B, device=rewards.device).index_add(0, lists, torch.ones_like(right))
    return hits / pairs.clamp(min=1)
