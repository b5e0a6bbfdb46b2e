"""The step on ranked lists (data/rankings.py): one forward of the policy over every response of every
list (in any layout, prefix sharing computing each prompt once for its K responses), then Plackett-Luce
DPO, or a pairwise loss of losses.py on the pairs `pairs_from_ranking` keeps (ranking_losses.py)."""

import copy

from dpokit.logprobs import response_logps
from dpokit.ranking_losses import plackett_luce_loss, ranked_pair_losses, ranking_accuracy
from dpokit.train.dpo_step import DPOStep


class RankingStep(DPOStep):
    """step(policy, batch) -> (losses (B,), metrics) for B ranked lists. The reference, TR-DPO's reference
    refresh, BCO's running mean and checkpointed state are DPOStep's.

    Metrics use the lists' best and worst responses: rewards/chosen (best), rewards/rejected (worst),
    rewards/margins, and rewards/accuracies, the fraction of a list's strictly ordered pairs whose implicit
    rewards are in the same order (K = 2: DPO's accuracy)."""

    def __init__(self, reference, cfg, lora_reference: bool = False):
        self.plackett_luce = cfg.loss_type == ["plackett_luce"]
        if self.plackett_luce:  # DPOStep sets up pairwise losses; Plackett-Luce needs what sigmoid needs
            cfg = copy.copy(cfg)
            cfg.loss_type = ["sigmoid"]
        super().__init__(reference, cfg, lora_reference)
        self.pairs_from_ranking = cfg.pairs_from_ranking or "all_pairs"
        self.reference_free = cfg.reference_free

    def __call__(self, policy, batch):
        tokens = response_logps(policy, batch, self.chunk_size)
        logps, n_tokens = tokens.sums(), tokens.lengths()  # (N,), (N,): every response of every list
        ref = self.reference_logps(policy, batch)  # (N,) or None
        ranks = batch["ranks"].to(logps.device)  # (B, K)
        index = batch["ranking_index"].to(logps.device).clamp(min=0)  # (B, K); padding slots: masked by ranks

        def lists(v):
            return None if v is None else v[index]  # (N,) -> (B, K)

        if self.plackett_luce:
            losses, rewards = plackett_luce_loss(lists(logps), lists(ref), ranks, self.beta, self.reference_free)
        else:
            kwargs = dict(self.hyper)
            if self.bco_mean is not None:
                kwargs["bco_delta"] = self.bco_delta(policy, logps, ref)
            losses, _, _, _ = ranked_pair_losses(
                self.loss_types,
                self.loss_weights,
                lists(logps),
                lists(ref),
                ranks,
                self.pairs_from_ranking,
                lengths=lists(n_tokens.float()) if self.needs_lengths else None,
                **kwargs,
            )
            # the implicit rewards of metrics: beta log pi/pi_ref, or SimPO's beta * mean token log-prob
            if ref is not None or self.reference_free:
                rewards = self.beta * lists((logps if ref is None else logps - ref).detach())
            else:
                rewards = self.beta * lists(logps.detach() / n_tokens.clamp(min=1))
        best, worst = ranks == 0, ranks == ranks.max(-1, keepdim=True).values  # (B, K)
        chosen = (rewards * best).sum(-1) / best.sum(-1)
        rejected = (rewards * worst).sum(-1) / worst.sum(-1)
        margins = chosen - rejected
        metrics = {
            "rewards/chosen": chosen,
            "rewards/rejected": rejected,
            "rewards/margins": margins,
            "rewards/accuracies": ranking_accuracy(rewards, ranks),  # K = 2: preference_accuracy
            "logps/chosen": (lists(logps.detach()) * best).sum(-1) / best.sum(-1),
            "logps/rejected": (lists(logps.detach()) * worst).sum(-1) / worst.sum(-1),
        }
        return losses, metrics
