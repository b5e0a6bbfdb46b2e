"""`dpokit rl`: the classic RLHF stage (Ziegler et al., 2019; Stiennon et al., 2020; Ouyang et al.,
2022) that DPO replaces: maximise a learned reward under a KL penalty to the reference,

    max_pi E_{x, y ~ pi}[ r(x, y) ] - beta KL(pi(.|x) || pi_ref(.|x))          (DPO paper, Eq. 3)

with RLOO (the default: no critic to train) or PPO, on the shared training loop. The objectives are
the pure functions of rl_losses.py; this file makes rollouts and feeds them.

One step of the loop, for its micro-batch of B prompts:
  1. rollout (no gradient): k = num_samples_per_prompt responses per prompt sampled from the policy
     (sampling.sample_responses: ancestral sampling at `temperature`, no top-k / top-p), scored by the
     reward (`rm:PATH`, `vader`, `module:function`; minus missing_eos_penalty for responses cut at
     max_new_tokens); the policy's log-probs, values and the reference's log-probs of every response
     token (the output layer in fp32 under bf16 autocast); per-token KL-penalised rewards; advantages
     (RLOO: the leave-one-out baseline over the k samples of a prompt, one advantage per response; PPO:
     GAE over the value head's values, lam 1 by default so that an untrained critic adds variance, not
     bias), whitened over the micro-batch if whiten_advantages.
  2. the loss at the current weights: the clipped surrogate (+ vf_coef x the clipped value loss), per
     response by `loss_aggregation` (a mean over its tokens, or the micro-batch's token mean), averaged
     over the prompt's k responses -> losses (B,). The loop then takes one optimizer step.
The forwards of both steps lay each prompt out once with its k samples, [prompt | y_1 | ... | y_k]
(prefix_sharing, train/rl_step.response_batch), rather than k padded copies.
A rollout is reused for `ppo_epochs` consecutive optimizer steps (PPO's epochs over one batch of
experience, one minibatch each): at the first, pi = pi_old and the ratio is 1; at the later ones the
ratio moves and clipping acts. The prompts the loop hands in on those later steps are not used, so
with ppo_epochs = E an epoch of the loop rolls out 1/E of the prompts: count training in max_steps.
The rollouts in use are checkpointed with the run, so resuming stays exact. With ppo_epochs = 1 the
rollout's policy log-probs (and values) are taken from the training forward itself, run once with grad:
the same numbers a separate no-grad forward gives, bit for bit (tests/test_rl.py), for one forward less.

Value head (PPO): one linear layer on the policy's last hidden state (the input of its lm_head),
zero-initialised, trained with the policy (shared trunk) at its own learning rate `value_lr` (its own
optimizer group, train/optim.param_groups): at the policy's rate a zero-initialised head stays near 0.
`critic_warmup_steps` first train the head alone on detached features (the policy stays pi_ref). It
lives in checkpoints; the final model directory holds the policy alone.

The adaptive KL coefficient (adaptive_kl) moves beta by at most 20% x (samples in the step) /
kl_horizon per optimizer step, following the KL of that step's new rollouts.

Of the shared config, `max_length` is unused (responses are bounded by max_new_tokens, prompts by
max_prompt_length), and per_device_train_batch_size counts prompts (k responses each).

Metrics: `reward` (the reward's score, after missing_eos_penalty), `reward_se` (its standard error
within the rollout), `kl` (sum over the response of log pi - log pi_ref: the sequence KL estimate),
`non_score_reward` (-beta kl), `kl_coef`, `entropy` (mean per-token entropy of the policy),
`finished` (the fraction of responses that ended with EOS within max_new_tokens), `advantage_mean`,
`advantage_std` (before whitening), `policy_loss`, `clipfrac`, `approx_kl` (between pi_old and pi),
`value_loss`, `value_clipfrac`, `value_explained_variance` (PPO: 1 - Var(G - V) / Var(G) over the
rollout's tokens; near 0 or below: the critic explains nothing yet), `response_length`. Evaluation
samples the held-out prompts and reports `eval/reward`, `eval/kl`, `eval/finished` and `eval/loss` =
-(reward - beta kl).
"""

import typing
from dataclasses import dataclass
from functools import partial

import torch

from dpokit import models
from dpokit.commands import prepare as prep
from dpokit.config import TrainConfig, opt
from dpokit.data.prompts import load_prompts, tokenize_prompt, truncate_prompt
from dpokit.errors import UserError
from dpokit.report import log
from dpokit.train.rl_step import PromptExample, RLStep, collate_prompts


@dataclass
class RLConfig(TrainConfig):
    """RLHF: PPO or RLOO on a reward (model), with a KL penalty to the reference (the pipeline DPO replaces)."""

    output_dir: str = opt("runs/rl", "where the trained policy, config, metrics and plots are written")
    dataset: str = opt(
        None,
        "prompts: rows with `prompt`, `messages` conversations, or preference rows (their "
        "prompts); per_device_train_batch_size counts prompts",
    )
    learning_rate: float = opt(3e-6, "peak learning rate")
    reward: str = opt(None, "the reward to maximise: rm:PATH (a `dpokit rm` model), vader, or module:function")
    ref_model: typing.Optional[str] = opt(
        None, "reference pi_ref of the KL penalty (default: a frozen copy of `model`, normally the SFT model)"
    )
    algorithm: str = opt(
        "rloo",
        "rloo: REINFORCE with the leave-one-out baseline over the k samples of a prompt (no critic to "
        "train: the default); ppo: clipped surrogate with a value head and GAE",
        ["rloo", "ppo"],
    )
    num_samples_per_prompt: int = opt(4, "responses sampled per prompt in each rollout (rloo needs >= 2)")
    max_new_tokens: int = opt(48, "maximum tokens per sampled response")
    temperature: float = opt(
        1.0, "sampling temperature; log-probs are those of the tempered policy (logits / temperature), as in TRL"
    )
    kl_coef: float = opt(0.05, "beta: the KL penalty's coefficient (the initial one, with adaptive_kl)")
    adaptive_kl: bool = opt(False, "adapt beta towards target_kl (Ziegler et al., 2019)")
    target_kl: float = opt(6.0, "adaptive_kl: the sequence KL to steer towards")
    kl_horizon: float = opt(
        1000.0,
        "adaptive_kl: horizon K, in samples (beta moves by at most 20% x samples-per-step / K per step); "
        "1000 lets beta change by 2-4x over a few hundred steps of 16-32 samples (Ziegler et al.'s 10000 "
        "was for batches of 512)",
    )
    ppo_epochs: int = opt(
        4, "optimizer steps on each rollout (PPO epochs, one minibatch each); 1: a fresh rollout every step"
    )
    cliprange: float = opt(0.2, "PPO's epsilon: the ratio pi / pi_old is clipped to [1 - eps, 1 + eps]")
    cliprange_value: float = opt(0.2, "values are clipped to the rollout's values +- this")
    vf_coef: float = opt(0.1, "weight of the value loss")
    value_lr: float = opt(
        1e-4,
        "PPO: learning rate of the value head (its own optimizer group, scheduled like learning_rate); "
        "a zero-initialised head at the policy's rate stays near 0 for the whole run",
    )
    critic_warmup_steps: int = opt(
        0,
        "PPO: optimizer steps at the start that train the value head alone (on the trunk's detached "
        "features, the policy unchanged), so GAE starts from a trained critic",
    )
    gamma: float = opt(1.0, "discount factor of GAE")
    lam: float = opt(
        1.0,
        "lambda of GAE; 1: Monte-Carlo advantages (return - V), unbiased whatever the critic; lower "
        "(e.g. 0.95) once value_explained_variance is well above 0, else an untrained critic biases the credit",
    )
    whiten_advantages: bool = opt(True, "normalise advantages to mean 0, std 1 over each rollout micro-batch")
    missing_eos_penalty: typing.Optional[float] = opt(
        None,
        "subtract this from the reward of responses that did not end with EOS within max_new_tokens "
        "(the `finished` metric is the fraction that did); none: a cut response keeps its reward",
    )
    loss_aggregation: str = opt(
        "sequence_mean",
        "per-token losses -> one per response: sequence_mean (mean over its tokens: every response "
        "weighs the same) or token_mean (every token of the micro-batch weighs the same: no length bias)",
        ["sequence_mean", "token_mean"],
    )
    prefix_sharing: bool = opt(
        True,
        "compute each prompt once for its k samples in the training forwards: one row [prompt | y_1 | ... "
        "| y_k] with a 4D mask (needs attn_implementation sdpa or eager); false: one padded row per sample",
    )

    def module_learning_rates(self) -> dict:
        """Modules with their own learning rate (train/optim.param_groups)."""
        return {"value_head": self.value_lr} if self.algorithm == "ppo" else {}

    def check(self):
        prep.refuse(self, "rl", ("padding_free", "logprob_chunk_size", "use_lora"))
        if self.reward is None:
            raise UserError("key 'reward' is required (rm:PATH, vader, or module:function)")
        if self.value_lr < 0 or self.critic_warmup_steps < 0:
            raise UserError("keys 'value_lr' and 'critic_warmup_steps': must be non-negative")
        for key in ("num_samples_per_prompt", "max_new_tokens", "ppo_epochs"):
            if getattr(self, key) < 1:
                raise UserError(f"key '{key}': must be at least 1, got {getattr(self, key)}")
        if self.algorithm == "rloo" and self.num_samples_per_prompt < 2:
            raise UserError("key 'num_samples_per_prompt': rloo needs at least 2 samples per prompt")
        if not self.temperature > 0:
            raise UserError(f"key 'temperature': must be positive for sampling, got {self.temperature}")
        for key in ("target_kl", "kl_horizon", "cliprange", "cliprange_value"):
            if not getattr(self, key) > 0:
                raise UserError(f"key '{key}': must be positive, got {getattr(self, key)}")
        if self.kl_coef < 0:
            raise UserError(f"key 'kl_coef': must be non-negative, got {self.kl_coef}")
        if self.vf_coef < 0 or not 0 <= self.gamma <= 1 or not 0 <= self.lam <= 1:
            raise UserError("keys 'vf_coef' (>= 0), 'gamma' and 'lam' (in [0, 1]) out of range")


def load_split(cfg, tokenizer, source, split) -> list:
    prompts, label = load_prompts(source, split)
    log.info("%s: %d distinct prompts", label, len(prompts))
    return [
        PromptExample(
            p,
            truncate_prompt(tokenize_prompt(tokenizer, p, label, row), cfg.max_prompt_length, cfg.truncation_mode),
            row,
        )
        for row, p in prompts
    ]


def rl(config=None, *, model=None, ref_model=None, tokenizer=None, train_dataset=None, eval_dataset=None, callbacks=()):
    """RLHF (PPO or RLOO) against `reward`; the arguments are those of dpokit.dpo (the datasets hold
    prompts). Returns a TrainResult whose model is the policy without its value head."""
    from dpokit.rewards import get_reward_fn

    cfg = prep.resolve_config(
        RLConfig, config, model=model, ref_model=ref_model, train_dataset=train_dataset, eval_dataset=eval_dataset
    )
    run = prep.prepare(
        cfg, load_split, model=model, tokenizer=tokenizer, train_dataset=train_dataset, eval_dataset=eval_dataset
    )
    reward_fn = get_reward_fn(cfg.reward)
    policy = run.model
    reference = prep.reference_model(cfg, policy, ref_model)
    reference = prep.frozen_copy(policy) if reference is policy else reference.requires_grad_(False).eval()
    reference.to(run.ranks.device)
    if cfg.algorithm == "ppo":
        hidden = policy.get_output_embeddings().weight.shape[1]
        policy.value_head = torch.nn.Linear(hidden, 1)
        torch.nn.init.zeros_(policy.value_head.weight)
        torch.nn.init.zeros_(policy.value_head.bias)
    if cfg.gradient_checkpointing:
        prep.enable_gradient_checkpointing(policy)
    step = RLStep(cfg, reference, reward_fn, run.tokenizer)
    return prep.train(
        cfg,
        run,
        step,
        collate_prompts,
        callbacks=callbacks,
        plot_keys=("reward", "kl", "loss"),
        save_fn=partial(_save, tokenizer=run.tokenizer),
        what="RL policy",
    )


def _save(model, out_dir, tokenizer, final=False, state_dict=None):
    """Checkpoints keep the value head (for resume); the final directory holds the policy alone.
    state_dict: a sharded (fsdp) model's whole weights, gathered by the loop."""
    model = models.unwrap_ddp(model)
    head = getattr(model, "value_head", None)
    if final and state_dict is not None:
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith("value_head.")}
    if final and head is not None:
        del model.value_head
    try:
        models.save_model(model, tokenizer, out_dir, **({} if state_dict is None else {"state_dict": state_dict}))
    finally:
        if final and head is not None:
            model.value_head = head
    return model
