"""The optimizer (AdamW, or RMSprop as in the DPO paper) and the learning-rate schedule (linear warmup,
then constant, linear or cosine decay to zero)."""

import math

import torch


def build_optimizer(cfg, params):
    params = [p for p in params if p.requires_grad]
    if cfg.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)


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
