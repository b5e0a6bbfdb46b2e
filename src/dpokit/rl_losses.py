"""The objectives of `dpokit rl`, the classic RLHF stage that DPO replaces, as pure functions of
per-token tensors (they know nothing of models or batches; train/rl_step.py feeds them).

Every per-token tensor is (N, R): N sampled responses, R the longest response, left-aligned, with a
mask (N, R) of 1.0 on real response tokens. Token t of response i is the action a_t taken in state
s_t = (x, y_<t); log pi(a_t | s_t) is `logps`, V(s_t) is `values`.

- The KL-penalised reward (Ziegler et al., 2019, Eq. 2; Stiennon et al., 2020, Eq. 1): the reward
  model's score r(x, y) arrives at the last token, and every token pays beta * (log pi - log pi_ref)
  (the single-sample estimate of the per-token KL): R(x, y) = r(x, y) - beta log pi(y|x)/pi_ref(y|x).
- GAE (Schulman et al., 2016): delta_t = r_t + gamma V(s_{t+1}) - V(s_t), A_t = sum_l (gamma lam)^l
  delta_{t+l}, with V = 0 after the last token; returns = A + V are the value targets.
- PPO (Schulman et al., 2017, Eq. 7): the clipped surrogate min(rho A, clip(rho, 1-eps, 1+eps) A) with
  rho = pi / pi_old per token, as a loss max(-rho A, -clip(rho) A); the value loss clipped around the
  rollout's values, 0.5 max((V - G)^2, (clip(V, V_old +- eps_v) - G)^2) (as in OpenAI's baselines
  and TRL).
- RLOO (Ahmadian et al., 2024, arXiv 2402.14740; Kool et al., 2019): k samples per prompt, each
  sequence's baseline is the mean reward of the other k - 1: A_i = R_i - (1/(k-1)) sum_{j != i} R_j.
- The adaptive KL coefficient of Ziegler et al. (2019, Sec. 2.2): beta <- beta (1 + K_beta e) with
  e = clip(KL / KL_target - 1, -0.2, 0.2) and K_beta = (samples in the batch) / horizon.
Per-token quantities become one number per response (`per_response`): by default the mean over its
tokens, so every response weighs the same whatever its length (`sequence_mean`, TRL's PPO); or, with
`token_mean`, the sum over its tokens divided by the mean length of the batch's responses, so that the
batch's mean over responses is the mean over all its tokens (every token weighs the same: no bias
towards short responses, the aggregation of Dr. GRPO / DAPO).
"""

import torch


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    """Mean of x over the masked entries: all of them (dim None) or along `dim`."""
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


AGGREGATIONS = ("sequence_mean", "token_mean")


def per_response(x: torch.Tensor, mask: torch.Tensor, aggregation: str = "sequence_mean") -> torch.Tensor:
    """Per-token x (N, R) -> one number per response (N,): see the module docstring."""
    if aggregation == "token_mean":
        return (x * mask).sum(-1) / mask.sum(-1).mean().clamp(min=1)
    return masked_mean(x, mask, -1)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var(returns - values) / Var(returns) over the masked tokens: 1 for a perfect critic, 0 for
    one no better than a constant, negative for one worse than that (nan when the returns are constant)."""
    var_returns = masked_mean((returns - masked_mean(returns, mask)) ** 2, mask)
    error = returns - values
    var_error = masked_mean((error - masked_mean(error, mask)) ** 2, mask)
    return float(1.0 - var_error / var_returns) if var_returns > 0 else float("nan")


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the masked entries (unbiased variance, as TRL); zero where mask is 0."""
    mean = masked_mean(x, mask)
    n = mask.sum()
    var = (((x - mean) ** 2) * mask).sum() / (n - 1).clamp(min=1)
    return (x - mean) * torch.rsqrt(var + eps) * mask


def kl_penalised_rewards(scores, logps, ref_logps, mask, kl_coef: float):
    """scores (N,): r(x, y); logps, ref_logps (N, R) -> (token rewards (N, R), per-token KL estimate (N, R)).

    r_t = -kl_coef (log pi(a_t|s_t) - log pi_ref(a_t|s_t)), plus r(x, y) on the last token."""
    kl = (logps - ref_logps) * mask
    rewards = -kl_coef * kl
    last = (mask.sum(-1).long() - 1).clamp(min=0)  # (N,)
    rewards = rewards.index_put(
        (torch.arange(len(scores), device=scores.device), last), scores.to(rewards.dtype), accumulate=True
    )
    return rewards, kl


def gae(rewards, values, mask, gamma: float, lam: float):
    """Generalized advantage estimation -> (advantages (N, R), returns (N, R)), both 0 off the mask."""
    rewards, values = rewards * mask, values * mask  # V = 0 past the last token: the episode has ended
    R = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(R)):
        next_value = values[:, t + 1] if t + 1 < R else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        advantages[:, t] = running
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def rloo_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """rewards (P, k): k sampled responses per prompt -> leave-one-out advantages (P, k)."""
    k = rewards.shape[-1]
    if k < 2:
        raise ValueError("RLOO needs at least 2 samples per prompt")
    return rewards - (rewards.sum(-1, keepdim=True) - rewards) / (k - 1)


def ppo_policy_loss(logps, old_logps, advantages, mask, cliprange: float, aggregation: str = "sequence_mean"):
    """Clipped surrogate -> (loss (N,) aggregated per `per_response`, clip fraction (N,), approx
    KL(pi_old || pi) (N,)), the last two token means."""
    log_ratio = logps - old_logps
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = per_response(torch.maximum(unclipped, clipped), mask, aggregation)
    clipfrac = masked_mean((clipped > unclipped).float(), mask, -1)
    approx_kl = masked_mean(0.5 * log_ratio.detach() ** 2, mask, -1)
    return loss, clipfrac.detach(), approx_kl


def ppo_value_loss(values, old_values, returns, mask, cliprange_value: float, aggregation: str = "sequence_mean"):
    """Clipped value loss -> (loss (N,), fraction of tokens where the clipped term was larger (N,))."""
    clipped_values = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    unclipped_loss = (values - returns) ** 2
    clipped_loss = (clipped_values - returns) ** 2
    loss = 0.5 * per_response(torch.maximum(unclipped_loss, clipped_loss), mask, aggregation)
    clipfrac = masked_mean((clipped_loss > unclipped_loss).float(), mask, -1)
    return loss, clipfrac.detach()


class KLController:
    """The KL coefficient beta: fixed, or adapted towards a target KL (Ziegler et al., 2019)."""

    def __init__(self, init: float, target=None, horizon: float = 10000.0):
        self.value, self.target, self.horizon = init, target, horizon

    def update(self, current_kl: float, n_samples: int):
        if self.target is None:
            return
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_samples / self.horizon
