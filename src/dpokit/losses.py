"""Preference losses: pure functions of per-sequence log-probs, knowing nothing of models or batches.

Each returns (losses (B,), chosen_rewards (B,), rejected_rewards (B,)): per-example losses, and the
implicit rewards beta * log(pi(y|x) / pi_ref(y|x)) of the chosen and rejected responses.
"""

import torch
import torch.nn.functional as F


def dpo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
             beta: float, label_smoothing: float = 0.0):
    """DPO, Rafailov et al. 2023 (arXiv 2305.18290), Eq. 7:

        L = -log sigmoid( beta log pi(y_w|x)/pi_ref(y_w|x) - beta log pi(y_l|x)/pi_ref(y_l|x) )

    With label_smoothing eps > 0, conservative DPO (Mitchell, 2023, "A note on DPO with noisy
    preferences"): the label is assumed flipped with probability eps, so
        L = -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h).
    All inputs (B,); the log-probs are sums over response tokens.
    """
    chosen_log_ratio = policy_chosen_logps - reference_chosen_logps
    rejected_log_ratio = policy_rejected_logps - reference_rejected_logps
    logits = chosen_log_ratio - rejected_log_ratio                     # h, (B,)
    losses = -(1 - label_smoothing) * F.logsigmoid(beta * logits) - label_smoothing * F.logsigmoid(-beta * logits)
    chosen_rewards = beta * chosen_log_ratio.detach()
    rejected_rewards = beta * rejected_log_ratio.detach()
    return losses, chosen_rewards, rejected_rewards


LOSSES = {"sigmoid": dpo_loss}
