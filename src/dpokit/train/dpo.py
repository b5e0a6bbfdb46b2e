"""The DPO stage: the step function (policy and frozen reference on one concatenated batch, then the
loss of losses.py) and the `dpokit dpo` job that wires data, models and the shared loop together."""

import copy
from functools import partial
from pathlib import Path

import torch

from dpokit import models
from dpokit.data.layouts import collate_for, layout_name
from dpokit.data.load import FILE_SUFFIXES, MissingSplit, load_pairs
from dpokit.data.tokenize import tokenize_dataset
from dpokit.errors import UserError
from dpokit.logprobs import sequence_logps
from dpokit.losses import RewardMean, combined_loss, named_weights, requirements, soft_update_reference
from dpokit.report import log, plot_metrics
from dpokit.train import kto, loop, refcache


class DPOStep:
    """step(policy, batch) -> (losses (B,), metrics): one forward of the policy over chosen and rejected
    together, the reference's log-probs under no_grad (or cached in the batch; none at all for
    reference-free losses), then the configured loss (or weighted sum of losses) of losses.py."""

    def __init__(self, reference, cfg, lora_reference: bool = False):
        self.reference = reference          # a frozen model, or None (cached log-probs / LoRA base / none needed)
        self.lora_reference = lora_reference  # pi_ref = the policy's base model with its adapters disabled
        self.chunk_size = cfg.logprob_chunk_size
        self.loss_types, self.loss_weights = list(cfg.loss_type), cfg.loss_weights
        self.needs_reference, self.needs_lengths = requirements(self.loss_types, cfg.reference_free,
                                                                cfg.ipo_length_normalize)
        self.hyper = {"beta": cfg.beta, "label_smoothing": cfg.label_smoothing, "reference_free": cfg.reference_free,
                      "ipo_length_normalize": cfg.ipo_length_normalize, "simpo_gamma": cfg.simpo_gamma,
                      "discopop_tau": cfg.discopop_tau}
        self.beta = cfg.beta
        # BCO's reward shift delta: a running mean of the implicit rewards over training (saved in checkpoints)
        self.bco_mean = RewardMean() if "bco_pair" in self.loss_types else None
        self.ref_sync_steps, self.ref_sync_alpha = cfg.ref_sync_steps, cfg.ref_sync_alpha

    def reference_logps(self, policy, batch):
        if not self.needs_reference:
            return None
        if "reference_logps" in batch:
            return batch["reference_logps"].to(batch["input_ids"].device)
        with torch.no_grad():
            if self.lora_reference:
                peft_model = getattr(policy, "module", policy)
                with peft_model.disable_adapter():
                    return sequence_logps(peft_model, batch, chunk_size=self.chunk_size)[0]
            return sequence_logps(self.reference, batch, chunk_size=self.chunk_size)[0]

    def __call__(self, policy, batch):
        B = batch["num_examples"]
        logps, n_tokens = sequence_logps(policy, batch, chunk_size=self.chunk_size)  # (2B,), (2B,)
        ref = self.reference_logps(policy, batch)                    # (2B,) or None
        kwargs = dict(self.hyper)
        if self.needs_lengths:
            kwargs.update(chosen_lengths=n_tokens[:B].float(), rejected_lengths=n_tokens[B:].float())
        if self.bco_mean is not None:
            if policy.training:
                # implicit rewards beta * log(pi / pi_ref); reference_free: log pi_ref = 0
                rewards = self.beta * (logps if ref is None else logps - ref).detach()
                total = loop.all_reduce_sum(torch.stack([rewards.sum(), torch.tensor(float(rewards.numel()))]).cpu())
                self.bco_mean.update(torch.full((int(total[1]),), (total[0] / total[1]).item()))
            kwargs["bco_delta"] = self.bco_mean.mean
        losses, chosen_rewards, rejected_rewards = combined_loss(
            self.loss_types, self.loss_weights, logps[:B], logps[B:],
            None if ref is None else ref[:B], None if ref is None else ref[B:], **kwargs)
        margins = chosen_rewards - rejected_rewards
        metrics = {
            "rewards/chosen": chosen_rewards,
            "rewards/rejected": rejected_rewards,
            "rewards/margins": margins,
            # A tie (the reference itself, or the policy before training) counts half: chance level.
            "rewards/accuracies": (margins > 0).float() + 0.5 * (margins == 0).float(),
            "logps/chosen": logps[:B].detach(),
            "logps/rejected": logps[B:].detach(),
        }
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

    def save_state(self, directory):
        """A reference that moves (TR-DPO) is part of the run's state: checkpoint it too."""
        if self.ref_sync_steps:
            from safetensors.torch import save_model

            save_model(self.reference, str(Path(directory) / "reference.safetensors"))

    def load_state(self, directory):
        if self.ref_sync_steps:
            from safetensors.torch import load_model

            load_model(self.reference, str(Path(directory) / "reference.safetensors"))


@torch.no_grad()
def policy_weights(policy) -> dict:
    """{name: tensor} of the policy's weights under a plain model's names. For a LoRA policy the adapted
    layers come merged, W + delta W, computed aside (merging in place and back would round W)."""
    policy = getattr(policy, "module", policy)  # DDP
    if not models.is_peft(policy):
        return named_weights(policy)
    from peft.tuners.lora import LoraLayer

    base = policy.get_base_model()
    modules = dict(base.named_modules())
    weights = {}
    named = list(base.named_parameters()) + [(k, v) for k, v in base.named_buffers() if v.is_floating_point()]
    for name, tensor in named:
        parts = name.split(".")
        if any(part.startswith("lora_") for part in parts):   # the adapters themselves
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
        batch["reference_logps"] = torch.tensor([p.reference_logps[0] for p in pairs] +
                                                [p.reference_logps[1] for p in pairs])
    return batch


def load_split(cfg, tokenizer, source, split):
    if cfg.loss_type == ["kto"]:
        return kto.load_kto_split(cfg, tokenizer, source, split)
    rows, label, fmt = load_pairs(source, split)
    examples, stats = tokenize_dataset(tokenizer, rows, label, cfg.max_length, cfg.max_prompt_length,
                                       cfg.truncation_mode)
    log.info("%s (%s): %s", label, fmt, stats.summary())
    return examples


def load_eval_split(cfg, tokenizer):
    """Held-out pairs: `eval_dataset`, else the test split of a `dataset` that has splits, else none."""
    if cfg.eval_dataset is not None:
        examples = load_split(cfg, tokenizer, cfg.eval_dataset, cfg.dataset_test_split)
    elif cfg.dataset.endswith(FILE_SUFFIXES):
        return []  # a single file has no held-out split; name one with eval_dataset
    else:
        try:
            examples = load_split(cfg, tokenizer, cfg.dataset, cfg.dataset_test_split)
        except MissingSplit:
            return []
    return examples[: cfg.max_eval_examples] if cfg.max_eval_examples else examples


def run(cfg):
    """`dpokit dpo`: everything that can fail on bad input happens before output_dir is touched."""
    ranks = loop.setup_distributed()
    loop.set_seed(cfg.seed)
    loop.check_output_dir(cfg)
    tokenizer = models.load_tokenizer(cfg.model, cfg.trust_remote_code)
    train_examples = load_split(cfg, tokenizer, cfg.dataset, cfg.dataset_train_split)
    eval_examples = load_eval_split(cfg, tokenizer)
    policy = models.load_model(cfg.model, cfg.trust_remote_code)
    loop.check_output_dir(cfg, sum(p.numel() for p in policy.parameters()))
    if cfg.disable_dropout:
        models.disable_dropout(policy)
    unpaired = cfg.loss_type == ["kto"]
    if unpaired and cfg.precompute_ref_log_probs:
        raise UserError("key 'precompute_ref_log_probs': not supported with kto (its KL pairs depend on the batch)")
    needs_reference = unpaired or requirements(cfg.loss_type, cfg.reference_free, cfg.ipo_length_normalize)[0]
    pad_id = tokenizer.pad_token_id
    reference, lora_reference = None, False
    if needs_reference:  # reference-free losses (simpo, orpo, sft, reference_free) load no reference at all
        # before any adapter exists, the policy itself is pi_ref unless another model is named
        reference = models.load_model(cfg.ref_model, cfg.trust_remote_code) if cfg.ref_model else policy
        models.disable_dropout(reference)
        reference.to(ranks.device)
        fixed = not cfg.ref_sync_steps and not unpaired
        if fixed:  # held-out reference log-probs once, not at every evaluation
            refcache.attach_reference_logps(reference, eval_examples, cfg, pad_id, ranks.device, use_disk_cache=False)
        if cfg.precompute_ref_log_probs:
            refcache.attach_reference_logps(reference, train_examples, cfg, pad_id, ranks.device, use_disk_cache=True)
            reference = None  # nothing of the reference stays in memory while training
        elif cfg.use_lora and not cfg.ref_model:
            reference, lora_reference = None, True  # no second copy: the base with adapters disabled
        elif reference is policy:
            reference = copy.deepcopy(policy)
        if reference is not None:
            reference.requires_grad_(False).eval()
    if cfg.use_lora:
        policy = models.add_lora(policy, cfg)
    if cfg.gradient_checkpointing:
        if hasattr(policy, "activation_checkpointing_enable"):  # transformers >= 5.x's name
            policy.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if cfg.use_lora:
            policy.enable_input_require_grads()
    layout = partial(collate_with_reference, collate=collate_for(layout_name(cfg.padding_free, cfg.prefix_sharing), pad_id))
    if unpaired:
        step, collate = kto.KTOStep(reference, cfg), partial(kto.collate_kto, pad_id=pad_id)
    else:
        step, collate = DPOStep(reference, cfg, lora_reference), layout
    save = partial(_save, tokenizer=tokenizer)
    trained = loop.train(cfg, policy, tokenizer, step, train_examples, eval_examples, collate, ranks, save_fn=save)
    if ranks.main:
        keys = ("loss", "rewards/chosen", "rewards/rejected", "kl") if unpaired else \
            ("loss", "rewards/accuracies", "rewards/margins")
        plot_metrics(f"{cfg.output_dir}/metrics.jsonl", f"{cfg.output_dir}/training_curves.png", keys)
        log.info("saved the trained model to %s", cfg.output_dir)
    return trained


def _save(model, out_dir, tokenizer, final=False):
    return models.save_model(model, tokenizer, out_dir, merge_lora=final)
