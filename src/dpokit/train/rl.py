"""`dpokit rl`: the classic RLHF stage (Ziegler et al., 2019; Stiennon et al., 2020; Ouyang et al.,
2022) that DPO replaces: maximise a learned reward under a KL penalty to the reference,

    max_pi E_{x, y ~ pi}[ r(x, y) ] - beta KL(pi(.|x) || pi_ref(.|x))          (DPO paper, Eq. 3)

with PPO, or with RLOO (lighter: no value head), on the shared training loop. The objectives are the
pure functions of rl_losses.py; this file makes rollouts and feeds them.

One step of the loop, for its micro-batch of B prompts:
  1. rollout (no gradient): k = num_samples_per_prompt responses per prompt sampled from the policy
     (generate.sample_responses: ancestral sampling at `temperature`, no top-k / top-p), scored by the
     reward (`rm:PATH`, `vader`, `module:function`; minus missing_eos_penalty for responses cut at
     max_new_tokens); the policy's log-probs, values and the reference's log-probs of every response
     token; per-token KL-penalised rewards; advantages (PPO: GAE over the value head's values; RLOO:
     the leave-one-out baseline over the k samples of a prompt, one advantage per response), whitened
     over the micro-batch if whiten_advantages.
  2. the loss at the current weights: the clipped surrogate (+ vf_coef x the clipped value loss), a
     token mean per response, averaged over the prompt's k responses -> losses (B,). The loop then
     takes one optimizer step.
A rollout is reused for `ppo_epochs` consecutive optimizer steps (PPO's epochs over one batch of
experience, one minibatch each): at the first, pi = pi_old and the ratio is 1; at the later ones the
ratio moves and clipping acts. The prompts the loop hands in on those later steps are not used, so
with ppo_epochs = E an epoch of the loop rolls out 1/E of the prompts: count training in max_steps.
The rollouts in use are checkpointed with the run, so resuming stays exact.

Value head (PPO): one linear layer on the policy's last hidden state (the input of its lm_head),
zero-initialised, trained with the policy (shared trunk). It lives in checkpoints; the final model
directory holds the policy alone.

Of the shared config, `max_length` is unused (responses are bounded by max_new_tokens, prompts by
max_prompt_length), and per_device_train_batch_size counts prompts (k responses each).

Metrics: `reward` (the reward's score), `kl` (sum over the response of log pi - log pi_ref: the
sequence KL estimate), `non_score_reward` (-beta kl), `kl_coef`, `entropy` (mean per-token entropy of
the policy), `policy_loss`, `clipfrac`, `approx_kl` (between pi_old and pi), `value_loss`,
`value_clipfrac` (PPO), `response_length`. Evaluation samples the held-out prompts and reports
`eval/reward`, `eval/kl`, and `eval/loss` = -(reward - beta kl).
"""

import copy
import inspect
import typing
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from dpokit import models
from dpokit.config import TrainConfig, opt
from dpokit.data.batch import pad_right
from dpokit.data.prompts import load_prompts, tokenize_prompt, truncate_prompt
from dpokit.errors import UserError
from dpokit.generate import sample_responses
from dpokit.logprobs import fp32_output_layer, unwrap
from dpokit.report import log, plot_metrics
from dpokit.rl_losses import (KLController, gae, kl_penalised_rewards, masked_mean, masked_whiten, ppo_policy_loss,
                              ppo_value_loss, rloo_advantages)
from dpokit.train import loop
from dpokit.train.stage import enable_gradient_checkpointing, refuse, train_and_eval


@dataclass
class RLConfig(TrainConfig):
    """RLHF: PPO or RLOO on a reward (model), with a KL penalty to the reference (the pipeline DPO replaces)."""

    output_dir: str = opt("runs/rl", "where the trained policy, config, metrics and plots are written")
    dataset: str = opt(None, "prompts: rows with `prompt`, `messages` conversations, or preference rows (their "
                       "prompts); per_device_train_batch_size counts prompts")
    learning_rate: float = opt(3e-6, "peak learning rate")
    reward: str = opt(None, "the reward to maximise: rm:PATH (a `dpokit rm` model), vader, or module:function")
    ref_model: typing.Optional[str] = opt(None, "reference pi_ref of the KL penalty (default: a frozen copy of "
                                          "`model`, normally the SFT model)")
    algorithm: str = opt("ppo", "ppo: clipped surrogate with a value head and GAE; rloo: REINFORCE with the "
                         "leave-one-out baseline (no value head)", ["ppo", "rloo"])
    num_samples_per_prompt: int = opt(4, "responses sampled per prompt in each rollout (rloo needs >= 2)")
    max_new_tokens: int = opt(48, "maximum tokens per sampled response")
    temperature: float = opt(1.0, "sampling temperature; log-probs are those of the tempered policy (logits / "
                             "temperature), as in TRL")
    kl_coef: float = opt(0.05, "beta: the KL penalty's coefficient (the initial one, with adaptive_kl)")
    adaptive_kl: bool = opt(False, "adapt beta towards target_kl (Ziegler et al., 2019)")
    target_kl: float = opt(6.0, "adaptive_kl: the sequence KL to steer towards")
    kl_horizon: float = opt(10000.0, "adaptive_kl: horizon K (beta moves by at most 20% x samples / K per step)")
    ppo_epochs: int = opt(4, "optimizer steps on each rollout (PPO epochs, one minibatch each); 1: a fresh "
                          "rollout every step")
    cliprange: float = opt(0.2, "PPO's epsilon: the ratio pi / pi_old is clipped to [1 - eps, 1 + eps]")
    cliprange_value: float = opt(0.2, "values are clipped to the rollout's values +- this")
    vf_coef: float = opt(0.1, "weight of the value loss")
    gamma: float = opt(1.0, "discount factor of GAE")
    lam: float = opt(0.95, "lambda of GAE")
    whiten_advantages: bool = opt(True, "normalise advantages to mean 0, std 1 over each rollout micro-batch")
    missing_eos_penalty: typing.Optional[float] = opt(None, "subtract this from the reward of responses that did "
                                                      "not end with EOS within max_new_tokens")


@dataclass
class PromptExample:
    prompt: typing.Any          # as in the data (string or messages): what the reward function is given
    prompt_ids: list
    row: int = 0


def collate_prompts(examples: list) -> dict:
    return {"prompt_ids": [e.prompt_ids for e in examples], "prompts": [e.prompt for e in examples],
            "num_examples": len(examples), "num_tokens": sum(len(e.prompt_ids) for e in examples)}


def response_batch(prompt_ids: list, responses: list, pad_id: int, device) -> dict:
    """N (prompt, response) -> right-padded sequences (N, T) and where each response token is predicted:
    `positions` (N, R), the index of the position whose logits give response token j (clamped past the end),
    `targets` (N, R), `mask` (N, R)."""
    seqs = [p + r for p, r in zip(prompt_ids, responses)]
    R = max(len(r) for r in responses)
    positions = torch.tensor([[len(p) - 1 + min(j, len(r) - 1) for j in range(R)]
                              for p, r in zip(prompt_ids, responses)])
    return {"input_ids": pad_right(seqs, pad_id).to(device),
            "attention_mask": pad_right([[1] * len(s) for s in seqs], 0).to(device),
            "positions": positions.to(device),
            "targets": pad_right(responses, pad_id).to(device),
            "mask": pad_right([[1] * len(r) for r in responses], 0).float().to(device)}


def token_stats(model, seqs: dict, temperature: float = 1.0, value_head: bool = False) -> dict:
    """One forward over the sequences -> per response token (N, R): `logps` log pi(a_t|s_t) at the
    temperature, `entropy` of pi(.|s_t), and `values` V(s_t) from the value head on the last hidden state.

    The logits come from the output layer run in fp32 even under bf16 autocast (logprobs.fp32_output_layer)
    and log pi = z - logsumexp(z). With the model's own bf16 head the old, new and reference log-probs
    carried the head's rounding too: on the embedded model (32-token responses) a sequence's log-prob was
    0.12 nats off fp32 on average (max 0.33), now 0.08 (max 0.27), the rest being the bf16 trunk's
    rounding (precision fp32 removes it)."""
    inner = unwrap(model)
    hidden = []
    hook = inner.get_output_embeddings().register_forward_pre_hook(lambda m, args: hidden.append(args[0])) \
        if value_head else None
    T, pos = seqs["input_ids"].shape[1], seqs["positions"]                                 # pos: (N, R)
    extra = {}
    if "logits_to_keep" in inspect.signature(inner.forward).parameters:
        keep = T - int(pos.min())           # no logits (nor value-head inputs) for the prompts' positions
        extra, pos = {"logits_to_keep": keep}, pos - (T - keep)
    try:
        with fp32_output_layer(model):        # (after the value head's hook: that one sees every position)
            logits = model(input_ids=seqs["input_ids"], attention_mask=seqs["attention_mask"], use_cache=False,
                           **extra).logits                                                   # (N, K, V) fp32
    finally:
        if hook is not None:
            hook.remove()
    picked = logits.gather(1, pos[..., None].expand(-1, -1, logits.shape[-1])).float() / temperature  # (N, R, V)
    logp_all = picked - picked.logsumexp(-1, keepdim=True)    # not log_softmax: see logprobs.token_logps
    out = {"logps": logp_all.gather(-1, seqs["targets"][..., None]).squeeze(-1),
           "entropy": -(logp_all.exp() * logp_all).sum(-1).detach()}
    if value_head:
        h = hidden[0].gather(1, pos[..., None].expand(-1, -1, hidden[0].shape[-1]))        # (N, R, H)
        out["values"] = inner.value_head(h.to(inner.value_head.weight.dtype)).squeeze(-1).float()
    return out


class RLStep:
    """step(policy, batch of prompts) -> (losses (B,), metrics (B,)): rollout, then PPO / RLOO loss."""

    def __init__(self, cfg, reference, reward_fn, tokenizer):
        self.cfg, self.reference, self.reward_fn, self.tokenizer = cfg, reference, reward_fn, tokenizer
        self.ppo = cfg.algorithm == "ppo"
        self.k = cfg.num_samples_per_prompt
        self.kl = KLController(cfg.kl_coef, cfg.target_kl if cfg.adaptive_kl else None, cfg.kl_horizon)
        self.calls = 0              # training micro-batches seen: which rollout is in use, and when to make one
        self.rollouts = {}          # micro-batch index within an optimizer step -> its rollout
        self.kl_sums = [0.0, 0]     # this optimizer step's new rollouts: sum of sequence KLs, count

    # --- rollouts -----------------------------------------------------------------------------------------

    @torch.no_grad()
    def rollout(self, model, batch) -> dict:
        cfg, tok, k = self.cfg, self.tokenizer, self.k
        policy = unwrap(model)
        prompt_ids = [p for p in batch["prompt_ids"] for _ in range(k)]                  # N = B k
        prompts = [p for p in batch["prompts"] for _ in range(k)]
        responses = sample_responses(policy, tok, prompt_ids, cfg.max_new_tokens, cfg.temperature,
                                     top_p=1.0, top_k=0, batch_size=len(prompt_ids))
        device = next(policy.parameters()).device
        texts = [tok.decode(r, skip_special_tokens=True) for r in responses]
        scores = torch.tensor([float(s) for s in self.reward_fn(prompts, texts)], device=device)   # (N,)
        finished = torch.tensor([r[-1] == tok.eos_token_id for r in responses], device=device)
        if cfg.missing_eos_penalty is not None:
            scores = scores - cfg.missing_eos_penalty * (~finished).float()
        seqs = response_batch(prompt_ids, responses, tok.pad_token_id, device)
        mask = seqs["mask"]
        own = token_stats(policy, seqs, cfg.temperature, value_head=self.ppo)
        ref = token_stats(self.reference, seqs, cfg.temperature)
        rewards, kl = kl_penalised_rewards(scores, own["logps"], ref["logps"], mask, self.kl.value)
        if self.ppo:
            advantages, returns = gae(rewards, own["values"], mask, cfg.gamma, cfg.lam)
        else:
            sequence_rewards = (rewards * mask).sum(-1)                                      # r - beta KL, (N,)
            advantages = rloo_advantages(sequence_rewards.view(-1, k)).view(-1, 1) * mask
            returns = None
        if cfg.whiten_advantages:
            advantages = masked_whiten(advantages, mask)
        out = {**seqs, "old_logps": own["logps"], "advantages": advantages, "scores": scores,
               "kl": kl.sum(-1), "kl_coef": torch.full_like(scores, self.kl.value), "lengths": mask.sum(-1)}
        if self.ppo:
            out.update(old_values=own["values"], returns=returns)
        return out

    def per_prompt(self, x):
        return x.view(-1, self.k).mean(-1)                                                  # (B k,) -> (B,)

    # --- the step -----------------------------------------------------------------------------------------

    def __call__(self, model, batch):
        if not model.training:
            return self.evaluate(model, batch)
        ga = self.cfg.gradient_accumulation_steps
        micro, optimizer_step = self.calls % ga, self.calls // ga
        self.calls += 1
        if micro == 0:
            self.kl_sums = [0.0, 0]
        if optimizer_step % self.cfg.ppo_epochs == 0 or micro not in self.rollouts:
            self.rollouts[micro] = self.rollout(model, batch)
            self.kl_sums[0] += float(self.rollouts[micro]["kl"].sum())
            self.kl_sums[1] += len(self.rollouts[micro]["kl"])
        r = self.rollouts[micro]
        mask = r["mask"]
        now = token_stats(model, r, self.cfg.temperature, value_head=self.ppo)
        policy_loss, clipfrac, approx_kl = ppo_policy_loss(now["logps"], r["old_logps"], r["advantages"], mask,
                                                           self.cfg.cliprange)
        loss = policy_loss
        metrics = {"policy_loss": policy_loss.detach(), "clipfrac": clipfrac, "approx_kl": approx_kl}
        if self.ppo:
            value_loss, value_clipfrac = ppo_value_loss(now["values"], r["old_values"], r["returns"], mask,
                                                        self.cfg.cliprange_value)
            loss = loss + self.cfg.vf_coef * value_loss
            metrics.update(value_loss=value_loss.detach(), value_clipfrac=value_clipfrac)
        metrics.update(reward=r["scores"], kl=r["kl"], non_score_reward=-r["kl_coef"] * r["kl"], kl_coef=r["kl_coef"],
                       entropy=masked_mean(now["entropy"], mask, -1), response_length=r["lengths"])
        return self.per_prompt(loss), {k: self.per_prompt(v) for k, v in metrics.items()}

    @torch.no_grad()
    def evaluate(self, model, batch):
        """Held-out prompts: sample, score, KL to the reference; seeded and without touching the training RNG."""
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.cfg.seed)
            r = self.rollout(model, batch)
        metrics = {"reward": r["scores"], "kl": r["kl"], "response_length": r["lengths"]}
        losses = -(r["scores"] - self.kl.value * r["kl"])
        return self.per_prompt(losses), {k: self.per_prompt(v) for k, v in metrics.items()}

    # --- hooks the shared loop calls -------------------------------------------------------------------

    def after_optimizer_step(self, step_no, policy):
        """The adaptive KL coefficient follows the KL of this step's new rollouts (all ranks together)."""
        total = loop.all_reduce_sum(torch.tensor(self.kl_sums, dtype=torch.float64))
        if total[1] > 0:
            self.kl.update(float(total[0] / total[1]), int(total[1]))

    def state_dict(self) -> dict:
        return {"kl_coef": self.kl.value, "calls": self.calls}

    def load_state_dict(self, state: dict):
        self.kl.value, self.calls = state["kl_coef"], state["calls"]

    def save_state(self, directory):
        """The rollouts still in use (ppo_epochs > 1) are part of the run's state."""
        if self.rollouts:
            torch.save({str(m): {k: v.cpu() for k, v in r.items()} for m, r in self.rollouts.items()},
                       Path(directory) / "rollouts.pt")

    def load_state(self, directory):
        path = Path(directory) / "rollouts.pt"
        if path.is_file():
            device = next(unwrap(self.reference).parameters()).device
            saved = torch.load(path, weights_only=True)
            self.rollouts = {int(m): {k: v.to(device) for k, v in r.items()} for m, r in saved.items()}


def load_split(cfg, tokenizer, source, split) -> list:
    prompts, label = load_prompts(source, split)
    log.info("%s: %d distinct prompts", label, len(prompts))
    return [PromptExample(p, truncate_prompt(tokenize_prompt(tokenizer, p, label, row), cfg.max_prompt_length,
                                             cfg.truncation_mode), row) for row, p in prompts]


def check(cfg):
    refuse(cfg, "rl", ("padding_free", "prefix_sharing", "logprob_chunk_size", "use_lora"))
    if cfg.reward is None:
        raise UserError("key 'reward' is required (rm:PATH, vader, or module:function)")
    for key in ("num_samples_per_prompt", "max_new_tokens", "ppo_epochs"):
        if getattr(cfg, key) < 1:
            raise UserError(f"key '{key}': must be at least 1, got {getattr(cfg, key)}")
    if cfg.algorithm == "rloo" and cfg.num_samples_per_prompt < 2:
        raise UserError("key 'num_samples_per_prompt': rloo needs at least 2 samples per prompt")
    if not cfg.temperature > 0:
        raise UserError(f"key 'temperature': must be positive for sampling, got {cfg.temperature}")
    for key in ("target_kl", "kl_horizon", "cliprange", "cliprange_value"):
        if not getattr(cfg, key) > 0:
            raise UserError(f"key '{key}': must be positive, got {getattr(cfg, key)}")
    if cfg.kl_coef < 0:
        raise UserError(f"key 'kl_coef': must be non-negative, got {cfg.kl_coef}")
    if cfg.vf_coef < 0 or not 0 <= cfg.gamma <= 1 or not 0 <= cfg.lam <= 1:
        raise UserError("keys 'vf_coef' (>= 0), 'gamma' and 'lam' (in [0, 1]) out of range")


def run(cfg):
    """`dpokit rl`: everything that can fail on bad input happens before output_dir is touched."""
    from dpokit.rewards import get_reward_fn

    check(cfg)
    ranks = loop.setup_distributed()
    loop.set_seed(cfg.seed)
    loop.check_output_dir(cfg)
    tokenizer = models.load_tokenizer(cfg.model, cfg.trust_remote_code)
    train_examples, eval_examples = train_and_eval(cfg, partial(load_split, cfg, tokenizer))
    reward_fn = get_reward_fn(cfg.reward)
    policy = models.load_model(cfg.model, cfg.trust_remote_code)
    loop.check_output_dir(cfg, sum(p.numel() for p in policy.parameters()))
    if cfg.disable_dropout:
        models.disable_dropout(policy)
    reference = models.load_model(cfg.ref_model, cfg.trust_remote_code) if cfg.ref_model else copy.deepcopy(policy)
    models.disable_dropout(reference)
    reference.requires_grad_(False).eval().to(ranks.device)
    if cfg.algorithm == "ppo":
        hidden = policy.get_output_embeddings().weight.shape[1]
        policy.value_head = torch.nn.Linear(hidden, 1)
        torch.nn.init.zeros_(policy.value_head.weight)
        torch.nn.init.zeros_(policy.value_head.bias)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(policy)
    step = RLStep(cfg, reference, reward_fn, tokenizer)
    trained = loop.train(cfg, policy, tokenizer, step, train_examples, eval_examples, collate_prompts, ranks,
                         save_fn=partial(_save, tokenizer=tokenizer))
    if ranks.main:
        plot_metrics(f"{cfg.output_dir}/metrics.jsonl", f"{cfg.output_dir}/training_curves.png",
                     ("reward", "kl", "loss"))
        log.info("saved the RL policy to %s", cfg.output_dir)
    return trained


def _save(model, out_dir, tokenizer, final=False):
    """Checkpoints keep the value head (for resume); the final directory holds the policy alone."""
    model = getattr(model, "module", model)
    head = getattr(model, "value_head", None)
    if final and head is not None:
        del model.value_head
    try:
        models.save_model(model, tokenizer, out_dir)
    finally:
        if final and head is not None:
            model.value_head = head
    return model
