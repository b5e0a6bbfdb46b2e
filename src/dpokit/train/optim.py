"""The optimizer (AdamW, or RMSprop as in the DPO paper) with per-module learning rates, and the
learning-rate schedule (linear warmup, then constant, linear or cosine decay to zero)."""

import math

import torch


def param_groups(cfg, model) -> list:
    """The trainable parameters as optimizer groups: the model's, then one per module with its own rate.

    `cfg.module_learning_rates()` (when the config has it) maps a module name to a learning rate; every
    parameter whose name has that module as a component (`value_head.weight` for `value_head`, also
    inside DDP's `module.`) goes to that module's group. The schedule scales every group alike (LambdaLR
    multiplies each group's own base rate), so a module keeps its ratio to the main rate throughout.
    The first group is the model's: its rate is what the loop logs as `learning_rate`."""
    rates = cfg.module_learning_rates() if hasattr(cfg, "module_learning_rates") else {}
    groups = {name: [] for name in [None, *rates]}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        parts = name.split(".")
        owner = next((m for m in rates if m in parts), None)
        groups[owner].append(p)
    out = [{"params": groups[None], "lr": cfg.learning_rate}]
    out += [{"params": groups[m], "lr": rates[m], "name": m} for m in rates if groups[m]]
    return out


def build_optimizer(cfg, model):
    """AdamW (betas, eps from the config) or RMSprop over `model`'s trainable parameters, by param_groups."""
    groups = param_groups(cfg, model)
    if cfg.optimizer == "rmsprop":
        return torch.optim.RMSprop(groups, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(
        groups,
        lr=cfg.learning_rate,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        eps=cfg.adam_epsilon,
        weight_decay=cfg.weight_decay,
    )


def lr_lambda(cfg, total_steps: int):
    """Linear warmup to the peak, then constant / linear decay to 0 / cosine decay to 0."""

    def f(step):
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        if cfg.lr_scheduler == "constant":
            return 1.0
        progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
        if cfg.lr_scheduler == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return f
