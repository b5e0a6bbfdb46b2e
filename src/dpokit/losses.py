"""Preference losses: pure functions of per-sequence log-probs, knowing nothing of models or batches.

Every paired loss has one calling convention:

    fn(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
       *, beta, chosen_lengths=None, rejected_lengths=None, **hyper) -> (losses, chosen_rewards, rejected_rewards)

All tensors are (B,). Log-probs are sums over response tokens; lengths are response token counts. The
rewards are detached implicit rewards: beta * log(pi(y|x) / pi_ref(y|x)) (DPO, Eq. 5) for losses with a
reference, beta * (average token log-prob) (SimPO, Eq. 4) for reference-free ones. Reference-free losses
(simpo, orpo, sft) accept None for the reference log-probs and never read them; the others take
`reference_free=True` to use a uniform reference, log pi_ref = 0, as the original DPO code does.

Notation in the docstrings: a = log pi(y_w|x)/pi_ref(y_w|x), b = log pi(y_l|x)/pi_ref(y_l|x) (the chosen
and rejected log-ratios), h = a - b, s = sigmoid, |y| = response length.

`LOSSES` maps each name to a LossSpec (function, whether it needs the reference / the lengths, paper,
formula); `combined_loss` sums several with weights (e.g. ["sigmoid", "sft"] is RPO). Unpaired data has
its own `kto_loss`; `soft_update_reference` is TR-DPO's reference refresh. See docs/losses.md.
"""

import inspect
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

# --- shared pieces ------------------------------------------------------------------------------------


def log_ratios(
    policy_chosen_logps,
    policy_rejected_logps,
    reference_chosen_logps,
    reference_rejected_logps,
    reference_free: bool = False,
):
    """(a, b): the chosen and rejected log-ratios log pi/pi_ref, each (B,). reference_free: pi_ref uniform,
    i.e. log pi_ref = 0 and the reference inputs are ignored (may be None)."""
    if reference_free:
        return policy_chosen_logps, policy_rejected_logps
    if reference_chosen_logps is None or reference_rejected_logps is None:
        raise ValueError("this loss needs the reference log-probs (or reference_free=True)")
    return policy_chosen_logps - reference_chosen_logps, policy_rejected_logps - reference_rejected_logps


def implicit_rewards(beta, chosen_log_ratio, rejected_log_ratio):
    """beta * log(pi / pi_ref) for chosen and rejected, detached (DPO, Eq. 5, up to beta log Z(x))."""
    return beta * chosen_log_ratio.detach(), beta * rejected_log_ratio.detach()


def average_logps(logps, lengths, name):
    """Per-token average log-prob, (B,). Used where the paper length-normalises (SimPO, ORPO, SFT)."""
    if lengths is None:
        raise ValueError(f"this loss needs {name} (response token counts)")
    return logps / lengths.to(logps.dtype).clamp(min=1)


def preference_accuracy(margins: torch.Tensor) -> torch.Tensor:
    """(B,) reward margins r(y_w) - r(y_l) -> (B,) 1 where the chosen response wins, 1/2 on a tie, 0
    otherwise: the reference (every implicit reward 0) sits at chance, 0.5."""
    return (margins > 0).float() + 0.5 * (margins == 0).float()


def log1mexp(x):
    """log(1 - exp(x)) for x < 0, accurate at both ends (Maechler, 2012)."""
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
_MAX_EXPONENT = 80.0  # exp(80) ~ 5.5e34: below fp32's max (3.4e38) with room for the 1/alpha and beta after it


def f_divergence_margin(a, b, f_divergence_type: str = "reverse_kl", alpha: float = 1.0):
    """f-DPO, Wang et al. 2023 (arXiv 2309.16240), Thm. 1 / Table 1: with the reverse KL of DPO replaced by
    an f-divergence, the loss is -log s(beta [f'(u_w) - f'(u_l)]), u = pi/pi_ref = exp(a) or exp(b). The
    constants of f' cancel in the difference, so this returns, (B,):

        reverse_kl        f'(u) = log u + 1              ->  a - b  (DPO)
        forward_kl        f'(u) = -1/u                   ->  exp(-b) - exp(-a)
        js_divergence     f'(u) = log(2u / (1 + u))      ->  (a - softplus(a)) - (b - softplus(b))
        alpha_divergence  f'(u) = (1 - u^-alpha) / alpha ->  (exp(-alpha b) - exp(-alpha a)) / alpha

    (forward_kl is alpha_divergence at alpha = 1, reverse_kl its limit alpha -> 0.) The exponents are
    capped at 80 so that a very unlikely response gives a large finite margin, not inf - inf.
    """
    if f_divergence_type == "reverse_kl":
        return a - b
    if f_divergence_type == "js_divergence":
        return (a - F.softplus(a)) - (b - F.softplus(b))

    def capped_exp(x):
        return torch.exp(x.clamp(max=_MAX_EXPONENT))

    if f_divergence_type == "forward_kl":
        return capped_exp(-b) - capped_exp(-a)
    if f_divergence_type == "alpha_divergence":
        if not alpha > 0:
            raise ValueError(f"f_alpha_divergence_coef must be > 0, got {alpha}")
        return (capped_exp(-alpha * b) - capped_exp(-alpha * a)) / alpha
    raise ValueError(f"unknown f_divergence_type {f_divergence_type!r} (valid: {', '.join(F_DIVERGENCES)})")


def length_desensitized_logps(public_logps, excess_logps, ld_alpha: float):
    """LD-DPO, Liu et al. 2024 (arXiv 2409.06411), Sec. 4: a response's log-likelihood with the tokens past
    the pair's public length l_p = min(|y_w|, |y_l|) down-weighted,

        log pi_hat(y|x) = sum_{t <= l_p} log pi(y_t|x,y_<t) + alpha * sum_{t > l_p} log pi(y_t|x,y_<t),

    applied alike to the policy and the reference. public_logps, excess_logps (B,); alpha = 1 is DPO."""
    return public_logps + ld_alpha * excess_logps


def wpo_weights(chosen_log_weights, rejected_log_weights):
    """WPO, Zhou et al. 2024 (arXiv 2406.11827), Eq. 2: the pair's weight w(x, y_w) w(x, y_l), (B,), from
    log w(x, y) = (1/|y|) sum_t log( pi(y_t|x,y_<t) / sum_v pi(v|x,y_<t)^2 ) (logprobs.ResponseLogps
    .wpo_log_weights), detached: the weights scale each pair's loss and carry no gradient."""
    return torch.exp(chosen_log_weights + rejected_log_weights).detach()


# --- losses with a reference ---------------------------------------------------------------------------


def dpo_loss(
    policy_chosen_logps,
    policy_rejected_logps,
    reference_chosen_logps,
    reference_rejected_logps,
    beta: float,
    label_smoothing: float = 0.0,
    *,
    reference_free: bool = False,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 1.0,
    chosen_lengths=None,
    rejected_lengths=None,
):
    """DPO, Rafailov et al. 2023 (arXiv 2305.18290), Eq. 7:

        L = -log s(beta h)

    With label_smoothing eps > 0, conservative DPO (cDPO; Mitchell 2023, "A note on DPO with noisy
    preferences"): the label is assumed flipped with probability eps, so
        L = -(1 - eps) log s(beta h) - eps log s(-beta h).
    Its optimum is finite: beta h* = log((1 - eps) / eps) on a pair seen only one way. eps may be a (B,)
    tensor of per-pair flip probabilities (soft labels).

    f_divergence_type other than reverse_kl: f-DPO, h becomes f'(u_w) - f'(u_l) (`f_divergence_margin`).
    """
    a, b = log_ratios(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, reference_free
    )
    logits = f_divergence_margin(a, b, f_divergence_type, f_alpha_divergence_coef)  # h, (B,)
    losses = -(1 - label_smoothing) * F.logsigmoid(beta * logits) - label_smoothing * F.logsigmoid(-beta * logits)
    return (losses, *implicit_rewards(beta, a, b))


def robust_loss(
    policy_chosen_logps,
    policy_rejected_logps,
    reference_chosen_logps,
    reference_rejected_logps,
    *,
    beta,
    label_smoothing: float = 0.0,
    reference_free: bool = False,
    chosen_lengths=None,
    rejected_lengths=None,
):
    """Robust DPO (rDPO), Chowdhury et al. 2024 (arXiv 2403.00409), the de-biased loss of Sec. 3:

        L = [ (1 - eps) * -log s(beta h)  -  eps * -log s(-beta h) ] / (1 - 2 eps)

    With labels flipped at random with probability eps (= label_smoothing, < 1/2), its expectation over
    the noise equals the clean DPO loss: an unbiased estimate, whereas cDPO (sigmoid with eps) is the
    DPO loss of the *noisy* label distribution. Unbounded below on a pair seen only one way.
    """
    if not 0 <= label_smoothing < 0.5:
        raise ValueError(f"robust loss needs 0 <= label_smoothing < 0.5, got {label_smoothing}")
    a, b = log_ratios(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, reference_free
    )
    logits = a - b
    losses = (
        (1 - label_smoothing) * -F.logsigmoid(beta * logits) - label_smoothing * -F.logsigmoid(-beta * logits)
    ) / (1 - 2 * label_smoothing)
    return (losses, *implicit_rewards(beta, a, b))


def ipo_loss(
    policy_chosen_logps,
    policy_rejected_logps,
    reference_chosen_logps,
    reference_rejected_logps,
    *,
    beta,
    ipo_length_normalize: bool = False,
    reference_free: bool = False,
    chosen_lengths=None,
    rejected_lengths=None,
):
    """IPO, Azar et al. 2023 (arXiv 2310.12036), Eq. 17, with tau = beta:

        L = (h - 1 / (2 tau))^2

    Its population optimum is pi(y) ~ pi_ref(y) exp(p(y > mu) / tau), finite even for deterministic
    preferences (Eq. 8 with Psi = identity). ipo_length_normalize=False (default) is the paper's h, built
    from summed sequence log-probs; True divides each log-ratio by its response length, as TRL's "ipo"
    does (a/|y_w| - b/|y_l|). We follow the paper: its target margin 1/(2 tau) and closed-form optimum are
    statements about whole-sequence log-ratios, and `dpokit verify` checks exactly that optimum.
    """
    a, b = log_ratios(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, reference_free
    )
    if ipo_length_normalize:
        logits = average_logps(a, chosen_lengths, "chosen_lengths") - average_logps(
            b, rejected_lengths, "rejected_lengths"
        )
    else:
        logits = a - b
    losses = (logits - 1 / (2 * beta)) ** 2
    return (losses, *implicit_rewards(beta, a, b))


def hinge_loss(
    policy_chosen_logps,
    policy_rejected_logps,
    reference_chosen_logps,
    reference_rejected_logps,
    *,
    beta,
    reference_free: bool = False,
    chosen_lengths=None,
    rejected_lengths=None,
):
    """SLiC / RSO hinge loss: RSO's "hinge-norm", Liu et al. 2023 (arXiv 2309.06657), Sec. 3; SLiC-HF's
    calibration loss (Zhao et al. 2023, arXiv 2305.10425) with the reference log-ratio and margin 1/beta:

        L = max(0, 1 - beta h)
    """
    a, b = log_ratios(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, reference_free
    )
    losses = torch.relu(1 - beta * (a - b))
    return (losses, *implicit_rewards(beta, a, b))


def nca_pair_loss(
    policy_chosen_logps,
    policy_rejected_logps,
    reference_chosen_logps,
    reference_rejected_logps,
    *,
    beta,
    reference_free: bool = False,
    chosen_lengths=None,
    rejected_lengths=None,
):
    """NCA, Chen et al. 2024 (arXiv 2402.05369), the NCA loss for K = 2 responses with a hard label:

        L = -log s(beta a) - 1/2 log s(-beta a) - 1/2 log s(-beta b)

    Each response's reward beta * log-ratio is judged on its own (absolute), not only the margin h.
    """
    a, b = log_ratios(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, reference_free
    )
    losses = -F.logsigmoid(beta * a) - 0.5 * F.logsigmoid(-beta * a) - 0.5 * F.logsigmoid(-beta * b)
    return (losses, *implicit_rewards(beta, a, b))


def exo_pair_loss(
    policy_chosen_logps,
    policy_rejected_logps,
    reference_chosen_logps,
    reference_rejected_logps,
    *,
    beta,
    label_smoothing: float = 1e-3,
    reference_free: bool = False,
    chosen_lengths=None,
    rejected_lengths=None,
):
    """EXO, Ji et al. 2024 (arXiv 2402.00856), Eq. 16 with K = 2: the reverse KL from the model's pair
    distribution p = (s(beta h), s(-beta h)) to the smoothed label distribution q = (1 - eps, eps):

        L = s(beta h) [log s(beta h) - log(1 - eps)] + s(-beta h) [log s(-beta h) - log eps]

    eps = label_smoothing; 0 means the default 1e-3 (as TRL), since eps = 0 makes log eps infinite.
    """
    eps = label_smoothing if label_smoothing > 0 else 1e-3
    a, b = log_ratios(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, reference_free
    )
    z = beta * (a - b)
    losses = torch.sigmoid(z) * (F.logsigmoid(z) - math.log(1 - eps)) + torch.sigmoid(-z) * (
        F.logsigmoid(-z) - math.log(eps)
    )
    return (losses, *implicit_rewards(beta, a, b))


def bco_pair_loss(
    policy_chosen_logps,
    policy_rejected_logps,
    reference_chosen_logps,
    reference_rejected_logps,
    *,
    beta,
    bco_delta=None,
    reference_free: bool = False,
    chosen_lengths=None,
    rejected_lengths=None,
):
    """BCO, Jung et al. 2024 (arXiv 2404.04656), the paired binary-classifier loss with reward shift delta:

        L = -log s(beta a - delta) - log s(-(beta b - delta))

    delta is the paper's reward shift, the mean implicit reward beta * log-ratio over chosen and rejected
    responses (it tightens the paper's bound of the DPO loss by this binary cross-entropy), tracked over
    training as a running mean: the caller keeps a `RewardMean`, updates it with this batch's rewards
    (gathered across ranks) and passes `bco_delta=state.update(...)`. TRL's unpaired BCOTrainer keeps the
    same running mean of every implicit reward; TRL's DPOTrainer `loss_type="bco_pair"` does not: in
    TRL 1.16 it applies no shift, -log s(beta a) - log s(-beta b), i.e. bco_delta=0 here (the two differ
    once the mean reward moves off zero: by 8e-4 in the loss and 3% in the gradient on one reviewed batch).
    None uses this batch's mean reward.
    """
    a, b = log_ratios(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, reference_free
    )
    chosen_rewards, rejected_rewards = implicit_rewards(beta, a, b)
    delta = torch.cat([chosen_rewards, rejected_rewards]).mean() if bco_delta is None else bco_delta
    losses = -F.logsigmoid(beta * a - delta) - F.logsigmoid(-(beta * b - delta))
    return losses, chosen_rewards, rejected_rewards


class RewardMean:
    """BCO's delta: the mean of every implicit reward seen so far (a count-weighted running mean).
    Keep one per training run; save `state_dict()` with checkpoints so a resumed run continues it."""

    def __init__(self):
        self.mean, self.count = 0.0, 0

    def update(self, rewards) -> float:
        """Fold in a tensor of rewards (any shape, detached); returns the new mean."""
        n = rewards.numel()
        if n:
            self.mean += (rewards.detach().double().mean().item() - self.mean) * n / (self.count + n)
            self.count += n
        return self.mean

    def state_dict(self):
        return {"mean": self.mean, "count": self.count}

    def load_state_dict(self, state):
        self.mean, self.count = float(state["mean"]), int(state["count"])


def sppo_hard_loss(
    policy_chosen_logps,
    policy_rejected_logps,
    reference_chosen_logps,
    reference_rejected_logps,
    *,
    beta,
    reference_free: bool = False,
    chosen_lengths=None,
    rejected_lengths=None,
):
    """SPPO, Wu et al. 2024 (arXiv 2405.00675), Eq. 4.7 (Algorithm 1) with eta = 1/beta and the hard win
    probability P(y_w > pi_t) = 1, P(y_l > pi_t) = 0 (the paper estimates soft ones with PairRM):

        L = (a - 1/(2 beta))^2 + (b + 1/(2 beta))^2
    """
    a, b = log_ratios(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, reference_free
    )
    losses = (a - 0.5 / beta) ** 2 + (b + 0.5 / beta) ** 2
    return (losses, *implicit_rewards(beta, a, b))


def apo_zero_loss(
    policy_chosen_logps,
    policy_rejected_logps,
    reference_chosen_logps,
    reference_rejected_logps,
    *,
    beta,
    reference_free: bool = False,
    chosen_lengths=None,
    rejected_lengths=None,
):
    """APO-zero, D'Oosterlinck et al. 2024 (arXiv 2408.06266), Eq. 7: push the chosen likelihood up and
    the rejected one down (for chosen answers better than the model's own):

        L = (1 - s(beta a)) + s(beta b)
    """
    a, b = log_ratios(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, reference_free
    )
    losses = (1 - torch.sigmoid(beta * a)) + torch.sigmoid(beta * b)
    return (losses, *implicit_rewards(beta, a, b))


def apo_down_loss(
    policy_chosen_logps,
    policy_rejected_logps,
    reference_chosen_logps,
    reference_rejected_logps,
    *,
    beta,
    reference_free: bool = False,
    chosen_lengths=None,
    rejected_lengths=None,
):
    """APO-down, D'Oosterlinck et al. 2024 (arXiv 2408.06266), Eq. 8: push both likelihoods down, the
    rejected one more (for chosen answers worse than the model's own):

        L = s(beta a) + (1 - s(beta (a - b)))
    """
    a, b = log_ratios(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, reference_free
    )
    losses = torch.sigmoid(beta * a) + (1 - torch.sigmoid(beta * (a - b)))
    return (losses, *implicit_rewards(beta, a, b))


def aot_loss(
    policy_chosen_logps,
    policy_rejected_logps,
    reference_chosen_logps,
    reference_rejected_logps,
    *,
    beta,
    label_smoothing: float = 0.0,
    reference_free: bool = False,
    chosen_lengths=None,
    rejected_lengths=None,
):
    """AOT (unpaired form), Melnyk et al. 2024 (arXiv 2406.05882): first-order stochastic dominance of
    the policy's margins over the reference's, via the one-dimensional optimal transport = sorting.
    With u = sort_batch(log pi(y_w) - log pi(y_l)), v = sort_batch(log pi_ref(y_w) - log pi_ref(y_l)):

        L_i = -(1 - eps) log s(beta (u_i - v_i)) - eps log s(-beta (u_i - v_i))

    The losses are per *rank* in the batch, not per pair: they depend on the whole batch.
    """
    a, b = log_ratios(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, reference_free
    )
    policy_margin = policy_chosen_logps - policy_rejected_logps  # (B,)
    reference_margin = policy_margin - (a - b)  # (B,), zeros if reference_free
    delta = torch.sort(policy_margin, dim=0).values - torch.sort(reference_margin, dim=0).values
    losses = -(1 - label_smoothing) * F.logsigmoid(beta * delta) - label_smoothing * F.logsigmoid(-beta * delta)
    return (losses, *implicit_rewards(beta, a, b))


def aot_pair_loss(
    policy_chosen_logps,
    policy_rejected_logps,
    reference_chosen_logps,
    reference_rejected_logps,
    *,
    beta,
    label_smoothing: float = 0.0,
    reference_free: bool = False,
    chosen_lengths=None,
    rejected_lengths=None,
):
    """AOT (paired form), Melnyk et al. 2024 (arXiv 2406.05882): the chosen log-ratios should dominate the
    rejected ones in distribution. With u = sort_batch(a), v = sort_batch(b):

        L_i = -(1 - eps) log s(beta (u_i - v_i)) - eps log s(-beta (u_i - v_i))
    """
    a, b = log_ratios(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, reference_free
    )
    delta = torch.sort(a, dim=0).values - torch.sort(b, dim=0).values
    losses = -(1 - label_smoothing) * F.logsigmoid(beta * delta) - label_smoothing * F.logsigmoid(-beta * delta)
    return (losses, *implicit_rewards(beta, a, b))


def discopop_loss(
    policy_chosen_logps,
    policy_rejected_logps,
    reference_chosen_logps,
    reference_rejected_logps,
    *,
    beta,
    discopop_tau: float = 0.05,
    reference_free: bool = False,
    chosen_lengths=None,
    rejected_lengths=None,
):
    """DiscoPOP / log-ratio modulated loss, Chris Lu et al. 2024 (arXiv 2406.08414), Eq. 5. With
    rho = beta h and the mixing weight m = s(rho / tau):

        L = (1 - m) * -log s(rho) + m * exp(-rho)

    m * exp(-rho) is computed as exp(log s(rho/tau) - rho): the naive product is 0 * inf = nan for very
    negative rho in fp32, where the true value is ~exp(rho (1/tau - 1)) -> 0.
    """
    a, b = log_ratios(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, reference_free
    )
    rho = beta * (a - b)
    losses = torch.sigmoid(-rho / discopop_tau) * -F.logsigmoid(rho) + torch.exp(F.logsigmoid(rho / discopop_tau) - rho)
    return (losses, *implicit_rewards(beta, a, b))


def sigmoid_norm_loss(
    policy_chosen_logps,
    policy_rejected_logps,
    reference_chosen_logps,
    reference_rejected_logps,
    *,
    beta,
    label_smoothing: float = 0.0,
    reference_free: bool = False,
    chosen_lengths=None,
    rejected_lengths=None,
):
    """DPO (arXiv 2305.18290, Eq. 7) on per-token log-ratios, TRL's loss_type="sigmoid_norm":

        L = -(1 - eps) log s(beta h_n) - eps log s(-beta h_n),   h_n = a / |y_w| - b / |y_l|

    The rewards stay the summed beta * a, beta * b of the other reference losses.
    """
    a, b = log_ratios(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, reference_free
    )
    h = average_logps(a, chosen_lengths, "chosen_lengths") - average_logps(b, rejected_lengths, "rejected_lengths")
    losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    return (losses, *implicit_rewards(beta, a, b))


# --- reference-free losses ------------------------------------------------------------------------------


def simpo_loss(
    policy_chosen_logps,
    policy_rejected_logps,
    reference_chosen_logps=None,
    reference_rejected_logps=None,
    *,
    beta,
    simpo_gamma: float = 0.5,
    chosen_lengths=None,
    rejected_lengths=None,
):
    """SimPO, Meng et al. 2024 (arXiv 2405.14734), Eq. 6: length-normalised reward, target margin gamma:

        L = -log s( beta/|y_w| log pi(y_w|x) - beta/|y_l| log pi(y_l|x) - gamma )

    simpo_gamma is gamma itself, in reward units, as in the paper and TRL's CPOConfig (default 0.5); the
    SimPO repository's `gamma_beta_ratio` is gamma / beta. The paper uses beta ~ 2-10, gamma/beta ~ 0.5.
    """
    avg_chosen = average_logps(policy_chosen_logps, chosen_lengths, "chosen_lengths")
    avg_rejected = average_logps(policy_rejected_logps, rejected_lengths, "rejected_lengths")
    losses = -F.logsigmoid(beta * (avg_chosen - avg_rejected) - simpo_gamma)
    return losses, beta * avg_chosen.detach(), beta * avg_rejected.detach()


def orpo_loss(
    policy_chosen_logps,
    policy_rejected_logps,
    reference_chosen_logps=None,
    reference_rejected_logps=None,
    *,
    beta,
    chosen_lengths=None,
    rejected_lengths=None,
):
    """ORPO, Hong et al. 2024 (arXiv 2403.07691), Eqs. 6-7, lambda = beta (TRL's convention):

        L = -log P(y_w|x) - lambda log s( log odds(y_w|x) - log odds(y_l|x) ),
        odds(y|x) = P(y|x) / (1 - P(y|x)),   log P(y|x) = (1/|y|) sum_t log pi(y_t|x, y_<t)

    Both terms use the per-token average log-prob, so log odds = avg - log(1 - exp(avg)).
    """
    avg_chosen = average_logps(policy_chosen_logps, chosen_lengths, "chosen_lengths")
    avg_rejected = average_logps(policy_rejected_logps, rejected_lengths, "rejected_lengths")
    log_odds = (avg_chosen - log1mexp(avg_chosen)) - (avg_rejected - log1mexp(avg_rejected))
    losses = -avg_chosen - beta * F.logsigmoid(log_odds)
    return losses, beta * avg_chosen.detach(), beta * avg_rejected.detach()


def sft_loss(
    policy_chosen_logps,
    policy_rejected_logps,
    reference_chosen_logps=None,
    reference_rejected_logps=None,
    *,
    beta,
    chosen_lengths=None,
    rejected_lengths=None,
):
    """SFT term: the per-token negative log-likelihood of the chosen response,

        L = -log pi(y_w|x) / |y_w|

    alone it is supervised fine-tuning; added to DPO (loss_types ["sigmoid", "sft"], weights [1, alpha])
    it is RPO, Pang et al. 2024 (arXiv 2404.19733), Eq. 1 (their NLL is length-normalised too).
    """
    avg_chosen = average_logps(policy_chosen_logps, chosen_lengths, "chosen_lengths")
    avg_rejected = average_logps(policy_rejected_logps, rejected_lengths, "rejected_lengths")
    return -avg_chosen, beta * avg_chosen.detach(), beta * avg_rejected.detach()


# --- the registry ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LossSpec:
    fn: Callable
    needs_reference: bool  # reads the reference log-probs (unless reference_free=True)
    needs_lengths: bool  # reads chosen_lengths / rejected_lengths (ipo: only if ipo_length_normalize)
    paper: str
    formula: str

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)

    @property
    def hyperparameters(self) -> set:
        """The keyword arguments the loss takes beyond the log-probs, beta and lengths."""
        return set(inspect.signature(self.fn).parameters) - _COMMON


_COMMON = {
    "policy_chosen_logps",
    "policy_rejected_logps",
    "reference_chosen_logps",
    "reference_rejected_logps",
    "beta",
    "chosen_lengths",
    "rejected_lengths",
}

LOSSES = {
    "sigmoid": LossSpec(
        dpo_loss,
        True,
        False,
        "DPO, arXiv 2305.18290 Eq. 7 (cDPO with label_smoothing)",
        "-(1-eps) log s(beta h) - eps log s(-beta h)",
    ),
    "robust": LossSpec(
        robust_loss,
        True,
        False,
        "rDPO, arXiv 2403.00409 Sec. 3",
        "[(1-eps) (-log s(beta h)) - eps (-log s(-beta h))] / (1 - 2 eps)",
    ),
    "ipo": LossSpec(ipo_loss, True, False, "IPO, arXiv 2310.12036 Eq. 17", "(h - 1/(2 beta))^2"),
    "hinge": LossSpec(hinge_loss, True, False, "SLiC arXiv 2305.10425 / RSO arXiv 2309.06657", "max(0, 1 - beta h)"),
    "nca_pair": LossSpec(
        nca_pair_loss, True, False, "NCA, arXiv 2402.05369", "-log s(beta a) - 1/2 log s(-beta a) - 1/2 log s(-beta b)"
    ),
    "exo_pair": LossSpec(
        exo_pair_loss,
        True,
        False,
        "EXO, arXiv 2402.00856 Eq. 16 (K=2)",
        "s(beta h)[log s(beta h) - log(1-eps)] + s(-beta h)[log s(-beta h) - log eps]",
    ),
    "bco_pair": LossSpec(
        bco_pair_loss, True, False, "BCO, arXiv 2404.04656", "-log s(beta a - delta) - log s(-(beta b - delta))"
    ),
    "sppo_hard": LossSpec(
        sppo_hard_loss,
        True,
        False,
        "SPPO, arXiv 2405.00675 Eq. 4.7 (hard P)",
        "(a - 1/(2 beta))^2 + (b + 1/(2 beta))^2",
    ),
    "apo_zero": LossSpec(apo_zero_loss, True, False, "APO, arXiv 2408.06266 Eq. 7", "1 - s(beta a) + s(beta b)"),
    "apo_down": LossSpec(apo_down_loss, True, False, "APO, arXiv 2408.06266 Eq. 8", "s(beta a) + 1 - s(beta h)"),
    "aot": LossSpec(
        aot_loss, True, False, "AOT, arXiv 2406.05882", "-log s(beta (sort(pi margins) - sort(ref margins))) per rank"
    ),
    "aot_pair": LossSpec(
        aot_pair_loss, True, False, "AOT, arXiv 2406.05882", "-log s(beta (sort(a) - sort(b))) per rank"
    ),
    "discopop": LossSpec(
        discopop_loss,
        True,
        False,
        "DiscoPOP, arXiv 2406.08414 Eq. 5",
        "(1 - s(beta h/tau)) (-log s(beta h)) + s(beta h/tau) exp(-beta h)",
    ),
    "sigmoid_norm": LossSpec(
        sigmoid_norm_loss,
        True,
        True,
        "DPO, arXiv 2305.18290 Eq. 7 on per-token log-ratios (TRL's sigmoid_norm)",
        "-(1-eps) log s(beta (a/|y_w| - b/|y_l|)) - eps log s(-beta (a/|y_w| - b/|y_l|))",
    ),
    "simpo": LossSpec(
        simpo_loss,
        False,
        True,
        "SimPO, arXiv 2405.14734 Eq. 6",
        "-log s(beta logpi(y_w)/|y_w| - beta logpi(y_l)/|y_l| - gamma)",
    ),
    "orpo": LossSpec(
        orpo_loss,
        False,
        True,
        "ORPO, arXiv 2403.07691 Eqs. 6-7",
        "-logpi(y_w)/|y_w| - beta log s(log odds(y_w) - log odds(y_l))",
    ),
    "sft": LossSpec(sft_loss, False, True, "NLL; + sigmoid = RPO, arXiv 2404.19733 Eq. 1", "-logpi(y_w)/|y_w|"),
}

HYPERPARAMETERS = set().union(*(spec.hyperparameters for spec in LOSSES.values()))


def combined_loss(loss_types, loss_weights=None, *args, **kwargs):
    """sum_k w_k * L_k, per example (B,), and the rewards of the first loss: (losses, chosen_rewards,
    rejected_rewards). Arguments are the common convention's (log-probs, beta, lengths) plus any
    hyper-parameter of any registered loss; each loss receives only those it takes, so one config can
    carry them all. A name no loss takes is a TypeError (a typo), an unknown loss type a ValueError.
    """
    if isinstance(loss_types, str):
        loss_types = [loss_types]
    unknown = [t for t in loss_types if t not in LOSSES]
    if unknown or not loss_types:
        raise ValueError(f"unknown loss type(s) {unknown} (valid: {', '.join(LOSSES)})")
    weights = [1.0] * len(loss_types) if loss_weights is None else list(loss_weights)
    if len(weights) != len(loss_types):
        raise ValueError(f"{len(loss_types)} loss types but {len(weights)} loss weights")
    stray = set(kwargs) - _COMMON - HYPERPARAMETERS
    if stray:
        raise TypeError(f"unknown loss argument(s) {sorted(stray)} (hyper-parameters: {sorted(HYPERPARAMETERS)})")
    total, rewards = 0, None
    for loss_type, weight in zip(loss_types, weights):
        fn = LOSSES[loss_type].fn
        accepted = inspect.signature(fn).parameters
        losses, chosen_rewards, rejected_rewards = fn(*args, **{k: v for k, v in kwargs.items() if k in accepted})
        total = total + weight * losses
        if rewards is None:
            rewards = (chosen_rewards, rejected_rewards)
    return (total, *rewards)


def requirements(loss_types, reference_free: bool = False, ipo_length_normalize: bool = False):
    """(needs_reference, needs_lengths) of a combination: what the step must compute for it."""
    names = [loss_types] if isinstance(loss_types, str) else list(loss_types)
    needs_reference = not reference_free and any(LOSSES[t].needs_reference for t in names)
    needs_lengths = any(LOSSES[t].needs_lengths for t in names) or (ipo_length_normalize and "ipo" in names)
    return needs_reference, needs_lengths


# --- unpaired data: KTO ---------------------------------------------------------------------------------


def kto_reference_point(policy_kl_logps, reference_kl_logps):
    """KTO's reference point z0 = KL(pi || pi_ref), estimated on mismatched (prompt, completion) pairs
    (each prompt with another example's completion) as the batch mean of log pi - log pi_ref, clamped at
    0 and detached (KTO, arXiv 2402.01306, Sec. 4.1). Inputs (B,); returns a 0-dim tensor. Under DDP
    pass the log-probs gathered from every rank, so all ranks share one z0 (TRL does the same)."""
    return (policy_kl_logps - reference_kl_logps).mean().detach().clamp(min=0)


def kto_loss(
    policy_logps,
    reference_logps,
    labels,
    kl_estimate,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
):
    """KTO, Ethayarajh et al. 2024 (arXiv 2402.01306), Eq. 8, for unpaired (x, y, desirable?) examples.
    With r = log pi(y|x)/pi_ref(y|x) and the reference point z0 (`kto_reference_point`, a constant):

        L = lambda_D (1 - s(beta (r - z0)))   if y is desirable,
            lambda_U (1 - s(beta (z0 - r)))   if not;   i.e. lambda_y - v(x, y).

    policy_logps, reference_logps (B,); labels (B,) bool, True = desirable. Returns (losses (B,),
    rewards (B,) = beta * r detached); split the rewards by label for chosen / rejected metrics.
    """
    labels = torch.as_tensor(labels, dtype=torch.bool, device=policy_logps.device)
    z0 = torch.as_tensor(kl_estimate, dtype=policy_logps.dtype, device=policy_logps.device).detach().clamp(min=0)
    log_ratio = policy_logps - reference_logps  # r, (B,)
    desirable = desirable_weight * (1 - torch.sigmoid(beta * (log_ratio - z0)))
    undesirable = undesirable_weight * (1 - torch.sigmoid(beta * (z0 - log_ratio)))
    return torch.where(labels, desirable, undesirable), beta * log_ratio.detach()


# --- TR-DPO: a reference that follows the policy --------------------------------------------------------


def named_weights(model) -> dict:
    """{name: tensor} of a model's parameters and floating-point buffers (what TR-DPO mixes)."""
    weights = dict(model.named_parameters())
    weights.update((k, v) for k, v in model.named_buffers() if v.is_floating_point())
    return weights


@torch.no_grad()
def soft_update_reference(reference_model, policy_model, alpha: float):
    """TR-DPO, Gorbatovski et al. 2024 (arXiv 2404.09656), Sec. 3: every tau steps,

        theta_ref <- alpha * theta + (1 - alpha) * theta_ref      (alpha = 1: the hard update, a copy)

    in place, for every parameter and floating-point buffer. The two models must have the same
    parameter names and shapes (a frozen full copy; not a LoRA base with adapters disabled); `policy_model`
    may also be a {name: tensor} mapping of its weights (a LoRA policy's, merged: dpo.policy_weights).
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    ref = named_weights(reference_model)
    pol = policy_model if isinstance(policy_model, dict) else named_weights(policy_model)
    if ref.keys() != pol.keys():
        raise ValueError(f"reference and policy differ in parameters: {sorted(ref.keys() ^ pol.keys())[:5]}")
    for name, r in ref.items():
        p = pol[name].to(device=r.device, dtype=r.dtype)
        if alpha == 1.0:
            r.copy_(p)
        else:
            r.lerp_(p, alpha)  # r + alpha (p - r)
