"""The reward-model step: Bradley-Terry on the rewards a scalar-head model gives chosen and rejected
(reward_model.py), in one forward over the padded pair layout. `dpokit rm` (commands/rm.py) runs it."""

from dpokit.losses import preference_accuracy
from dpokit.reward_model import bradley_terry_loss, sequence_rewards


class RewardStep:
    """step(model, batch) -> (losses (B,), metrics) on the padded pair layout: rows 0..B-1 chosen, B..2B-1
    rejected."""

    def __init__(self, cfg):
        self.center = cfg.center_rewards_coefficient

    def __call__(self, model, batch):
        B = batch["num_examples"]
        rewards = sequence_rewards(model, batch["input_ids"], batch["attention_mask"])  # (2B,)
        chosen, rejected = rewards[:B], rewards[B:]
        losses = bradley_terry_loss(chosen, rejected)
        if self.center:
            losses = losses + self.center * (chosen + rejected) ** 2
        margins = (chosen - rejected).detach()
        metrics = {
            "accuracy": preference_accuracy(margins),
            "rewards/chosen": chosen.detach(),
            "rewards/rejected": rejected.detach(),
            "rewards/margins": margins,
        }
        return losses, metrics
