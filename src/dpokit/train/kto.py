"""KTO on unpaired data (Ethayarajh et al., 2024, arXiv 2402.01306): rows (prompt, completion, label),
label true for a desirable completion.

The batch reuses the paired layout: row i holds prompt_i + completion_i (the "chosen" half) and
prompt_i + completion_{i+1} (the "rejected" half): the mismatched pairs whose log-ratios estimate the
reference point z0 = KL(pi || pi_ref) (`losses.kto_reference_point`), so one forward pass of the policy
(and one of the reference) serves both.
"""

import torch

from dpokit.data.batch import collate_padded
from dpokit.data.load import load_unpaired
from dpokit.data.tokenize import TokenizedPair, tokenize_dataset
from dpokit.errors import UserError
from dpokit.logprobs import sequence_logps
from dpokit.losses import kto_loss, kto_reference_point
from dpokit.report import log
from dpokit.train.runtime import all_reduce_sum


class KTOExample(TokenizedPair):
    """prompt_ids, chosen_ids = the completion (rejected_ids unused), and the label."""

    def __init__(self, prompt_ids, completion_ids, label: bool, row=0):
        super().__init__(prompt_ids, completion_ids, completion_ids, row)
        self.label = label


def load_kto_split(cfg, tokenizer, source, split) -> list:
    rows, label, fmt = load_unpaired(source, split)
    pairs, stats = tokenize_dataset(
        tokenizer, rows, label, cfg.max_length, cfg.max_prompt_length, cfg.truncation_mode, completions=True
    )
    labels = {row: ex["label"] for row, ex in rows}
    out = [KTOExample(p.prompt_ids, p.chosen_ids, labels[p.row], p.row) for p in pairs]
    log.info(
        "%s (%s, unpaired): %s, %d desirable",
        label,
        fmt,
        stats.summary().replace("pairs", "examples"),
        sum(e.label for e in out),
    )
    return out


def collate_kto(examples: list, pad_id: int) -> dict:
    """B examples -> the paired layout with each prompt's mismatched completion (the next example's) as
    the second half, plus labels (B,)."""
    if len(examples) < 2:
        raise UserError(
            "kto needs per_device_train_batch_size >= 2 (the KL estimate pairs each prompt "
            "with another example's completion)"
        )
    B = len(examples)
    mixed = [
        TokenizedPair(e.prompt_ids, e.chosen_ids, examples[(i + 1) % B].chosen_ids) for i, e in enumerate(examples)
    ]
    batch = collate_padded(mixed, pad_id)
    batch["labels"] = torch.tensor([e.label for e in examples])
    return batch


class KTOStep:
    """step(policy, batch) -> (losses (B,), metrics) for KTO."""

    def __init__(self, reference, cfg):
        self.reference, self.beta = reference, cfg.beta
        self.desirable_weight, self.undesirable_weight = cfg.desirable_weight, cfg.undesirable_weight

    def __call__(self, policy, batch):
        B = batch["num_examples"]
        logps, _ = sequence_logps(policy, batch)  # (2B,): matched, then mismatched
        with torch.no_grad():
            ref = sequence_logps(self.reference, batch)[0]
            # z0 from every rank's mismatched pairs, so all ranks share one reference point
            kl_sum = all_reduce_sum(torch.stack([(logps[B:] - ref[B:]).sum().detach().cpu(), torch.tensor(float(B))]))
            z0 = kto_reference_point(kl_sum[0:1] / kl_sum[1], torch.zeros(1))
        labels = batch["labels"].to(logps.device)
        losses, rewards = kto_loss(
            logps[:B],
            ref[:B],
            labels,
            z0,
            beta=self.beta,
            desirable_weight=self.desirable_weight,
            undesirable_weight=self.undesirable_weight,
        )
        good, bad = labels.float(), (~labels).float()
        metrics = {
            # means over the desirable (resp. undesirable) examples only: (values, mask) pairs
            "rewards/chosen": (rewards, good),
            "rewards/rejected": (rewards, bad),
            "logps/chosen": (logps[:B].detach(), good),
            "logps/rejected": (logps[:B].detach(), bad),
            "kl": z0.expand(B),
        }
        return losses, metrics
