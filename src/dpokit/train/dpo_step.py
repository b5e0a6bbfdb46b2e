"""The DPO step: the policy and the frozen reference on one concatenated batch of pairs, then the loss
(or weighted sum of losses) of losses.py. `dpokit dpo` (commands/dpo.py) hands it to the shared loop."""

from pathlib import Path

import torch

from dpokit import models
from dpokit.logprobs import resolve_chunk_size, response_logps
from dpokit.losses import (
    RewardMean,
    combined_loss,
    length_desensitized_logps,
    named_weights,
    preference_accuracy,
    requirements,
    soft_update_reference,
    wpo_weights,
)
from dpokit.train.runtime import all_reduce_sum


class DPOStep:
    """step(policy, batch) -> (losses (B,), metrics): one forward of the policy over chosen and rejected
    together, the reference's log-probs under no_grad (or cached in the batch; none at all for
    reference-free losses), then the configured loss (or weighted sum of losses) of losses.py.

    Options on top of the losses: rpo_alpha appends ("sft", alpha) to the losses (RPO); ld_alpha rescales
    the log-probs past each pair's public length, policy and reference alike (LD-DPO); use_weighting
    multiplies each pair's total loss by its WPO weight, computed from the policy's logits under no_grad;
    f_divergence_type goes to the sigmoid loss (f-DPO)."""

    def __init__(self, reference, cfg, lora_reference: bool = False):
        self.reference = reference  # a frozen model, or None (cached log-probs / LoRA base / none needed)
        self.lora_reference = lora_reference  # pi_ref = the policy's base model with its adapters disabled
        # 0: automatic (sized from the policy's vocabulary at the first step; off for WPO's full logits)
        self.chunk_size = None if cfg.use_weighting and not cfg.logprob_chunk_size else cfg.logprob_chunk_size
        self.loss_types, self.loss_weights = list(cfg.loss_type), cfg.loss_weights
        if cfg.rpo_alpha is not None:  # RPO (arXiv 2404.19733) is exactly DPO + alpha * the sft loss
            weights = [1.0] * len(self.loss_types) if self.loss_weights is None else list(self.loss_weights)
            self.loss_types, self.loss_weights = self.loss_types + ["sft"], weights + [cfg.rpo_alpha]
        self.needs_reference, self.needs_lengths = requirements(
            self.loss_types, cfg.reference_free, cfg.ipo_length_normalize
        )
        self.use_weighting, self.ld_alpha = cfg.use_weighting, cfg.ld_alpha
        self.hyper = {
            "beta": cfg.beta,
            "label_smoothing": cfg.label_smoothing,
            "reference_free": cfg.reference_free,
            "ipo_length_normalize": cfg.ipo_length_normalize,
            "simpo_gamma": cfg.simpo_gamma,
            "discopop_tau": cfg.discopop_tau,
            "f_divergence_type": cfg.f_divergence_type,
            "f_alpha_divergence_coef": cfg.f_alpha_divergence_coef,
        }
        self.beta = cfg.beta
        # BCO's reward shift delta: a running mean of the implicit rewards over training (saved in checkpoints)
        self.bco_mean = RewardMean() if "bco_pair" in self.loss_types else None
        self.ref_sync_steps, self.ref_sync_alpha = cfg.ref_sync_steps, cfg.ref_sync_alpha

    def sequence_logps(self, tokens, B):
        """(2B,) the log-probs the losses see: sums over the response, or LD-DPO's rescaled sums."""
        if self.ld_alpha is None:
            return tokens.sums()
        n = tokens.lengths()
        public = torch.minimum(n[:B], n[B:]).repeat(2)  # (2B,) l_p of each sequence's pair
        return length_desensitized_logps(*tokens.split_sums(public), self.ld_alpha)

    def reference_logps(self, policy, batch):
        if not self.needs_reference:
            return None
        cached = batch.get("reference_logps")
        # cached sums serve plain losses; LD-DPO needs the reference's per-token log-probs (its check
        # refuses precompute_ref_log_probs, so a reference model is there whenever that cache is not)
        if cached is not None and (self.ld_alpha is None or (self.reference is None and not self.lora_reference)):
            return cached.to(batch["input_ids"].device)
        B = batch["num_examples"]
        with torch.no_grad():
            if self.lora_reference:
                peft_model = models.unwrap_ddp(policy)
                with peft_model.disable_adapter():
                    return self.sequence_logps(response_logps(peft_model, batch, self.chunk_size), B)
            return self.sequence_logps(response_logps(self.reference, batch, self.chunk_size), B)

    def bco_delta(self, policy, logps, ref) -> float:
        """BCO's reward shift: the running mean of the implicit rewards of every response seen in training
        (over all ranks), updated with this batch's `logps`, `ref` (N,) when the policy trains."""
        if policy.training:
            # implicit rewards beta * log(pi / pi_ref); reference_free: log pi_ref = 0
            rewards = self.beta * (logps if ref is None else logps - ref).detach()
            total = all_reduce_sum(torch.stack([rewards.sum(), torch.tensor(float(rewards.numel()))]).cpu())
            self.bco_mean.update(torch.full((int(total[1]),), (total[0] / total[1]).item()))
        return self.bco_mean.mean

    def __call__(self, policy, batch):
        B = batch["num_examples"]
        if self.chunk_size == 0:
            self.chunk_size = resolve_chunk_size(policy, 0)
        tokens = response_logps(policy, batch, self.chunk_size, wpo=self.use_weighting)
        logps, n_tokens = self.sequence_logps(tokens, B), tokens.lengths()  # (2B,), (2B,)
        ref = self.reference_logps(policy, batch)  # (2B,) or None
        kwargs = dict(self.hyper)
        if self.needs_lengths:
            kwargs.update(chosen_lengths=n_tokens[:B].float(), rejected_lengths=n_tokens[B:].float())
        if self.bco_mean is not None:
            kwargs["bco_delta"] = self.bco_delta(policy, logps, ref)
        losses, chosen_rewards, rejected_rewards = combined_loss(
            self.loss_types,
            self.loss_weights,
            logps[:B],
            logps[B:],
            None if ref is None else ref[:B],
            None if ref is None else ref[B:],
            **kwargs,
        )
        weights = None
        if self.use_weighting:  # WPO: the pair's whole loss, times w(x, y_w) w(x, y_l) (no gradient)
            log_w = tokens.wpo_log_weights()  # (2B,)
            weights = wpo_weights(log_w[:B], log_w[B:])
            losses = losses * weights
        margins = chosen_rewards - rejected_rewards
        metrics = {
            "rewards/chosen": chosen_rewards,
            "rewards/rejected": rejected_rewards,
            "rewards/margins": margins,
            # A tie (the reference itself, or the policy before training) counts half: chance level.
            "rewards/accuracies": preference_accuracy(margins),
            "logps/chosen": logps[:B].detach(),
            "logps/rejected": logps[B:].detach(),
        }
        if weights is not None:
            metrics["wpo/weights"] = weights
        return losses, metrics

    # --- hooks the shared loop calls -------------------------------------------------------------------

    def after_optimizer_step(self, step_no, policy):
        """TR-DPO (arXiv 2404.09656): every ref_sync_steps, pi_ref <- alpha pi + (1 - alpha) pi_ref."""
        if self.ref_sync_steps and step_no % self.ref_sync_steps == 0:
            soft_update_reference(self.reference, policy_weights(policy), self.ref_sync_alpha)

    def state_dict(self) -> dict:
        return {"bco": self.bco_mean.state_dict()} if self.bco_mean is not None else {}

    def load_state_dict(self, state: dict):
        if self.bco_mean is not None:
            self.bco_mean.load_state_dict(state["bco"])

    def moving_models(self) -> dict:
        """Models besides the policy whose weights training changes: a sharded checkpoint (fsdp,
        train/parallel.py) holds them in its DCP state; otherwise save_state writes them."""
        return {"reference": self.reference} if self.ref_sync_steps else {}

    def save_state(self, directory):
        """A reference that moves (TR-DPO) is part of the run's state: checkpoint it too (a sharded one
        went into the checkpoint's DCP state, see moving_models)."""
        if self.ref_sync_steps and not any(hasattr(p, "to_local") for p in self.reference.parameters()):
            from safetensors.torch import save_model

            save_model(self.reference, str(Path(directory) / "reference.safetensors"))

    def load_state(self, directory):
        path = Path(directory) / "reference.safetensors"
        sharded = any(hasattr(p, "to_local") for p in self.reference.parameters()) if self.ref_sync_steps else False
        # (absent: a sharded checkpoint's DCP state had it; sharded: the loop loaded it, moving_models)
        if self.ref_sync_steps and path.is_file() and not sharded:
            from safetensors.torch import load_model

            load_model(self.reference, str(path))


@torch.no_grad()
def policy_weights(policy) -> dict:
    """{name: tensor} of the policy's weights under a plain model's names. For a LoRA policy the adapted
    layers come merged, W + delta W, computed aside (merging in place and back would round W)."""
    policy = models.unwrap_ddp(policy)
    if not models.is_peft(policy):
        return named_weights(policy)
    from peft.tuners.lora import LoraLayer

    base = policy.get_base_model()
    modules = dict(base.named_modules())
    weights = {}
    named = list(base.named_parameters()) + [(k, v) for k, v in base.named_buffers() if v.is_floating_point()]
    for name, tensor in named:
        parts = name.split(".")
        if any(part.startswith("lora_") for part in parts):  # the adapters themselves
            continue
        if "base_layer" in parts:
            owner = ".".join(parts[: parts.index("base_layer")])
            layer = modules[owner]
            if parts[-1] == "weight" and isinstance(layer, LoraLayer) and not layer.merged:
                tensor = tensor + sum(layer.get_delta_weight(a) for a in layer.active_adapters)
            name = name.replace(".base_layer.", ".")
        weights[name] = tensor
    return weights


def collate_with_reference(pairs, collate):
    """The layout's batch, plus the pairs' cached reference log-probs when every pair has them."""
    batch = collate(pairs)
    if all(getattr(p, "reference_logps", None) is not None for p in pairs):
        batch["reference_logps"] = torch.tensor(
            [p.reference_logps[0] for p in pairs] + [p.reference_logps[1] for p in pairs]
        )
    return batch
