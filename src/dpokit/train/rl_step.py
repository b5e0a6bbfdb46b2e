"""The RLHF step (PPO with a value head and GAE, or RLOO): rollouts from the policy scored by a reward,
then the clipped surrogate on them; see commands/rl.py for the whole method and its metrics."""

import inspect
import typing
from dataclasses import dataclass
from pathlib import Path

import torch

from dpokit.data.batch import pad_right
from dpokit.logprobs import fp32_output_layer, unwrap
from dpokit.rl_losses import (
    KLController,
    gae,
    kl_penalised_rewards,
    masked_mean,
    masked_whiten,
    ppo_policy_loss,
    ppo_value_loss,
    rloo_advantages,
)
from dpokit.sampling import sample_responses
from dpokit.train.runtime import all_reduce_sum


@dataclass
class PromptExample:
    prompt: typing.Any  # as in the data (string or messages): what the reward function is given
    prompt_ids: list
    row: int = 0


def collate_prompts(examples: list) -> dict:
    return {
        "prompt_ids": [e.prompt_ids for e in examples],
        "prompts": [e.prompt for e in examples],
        "num_examples": len(examples),
        "num_tokens": sum(len(e.prompt_ids) for e in examples),
    }


def response_batch(prompt_ids: list, responses: list, pad_id: int, device) -> dict:
    """N (prompt, response) -> right-padded sequences (N, T) and where each response token is predicted:
    `positions` (N, R), the index of the position whose logits give response token j (clamped past the end),
    `targets` (N, R), `mask` (N, R)."""
    seqs = [p + r for p, r in zip(prompt_ids, responses)]
    R = max(len(r) for r in responses)
    positions = torch.tensor(
        [[len(p) - 1 + min(j, len(r) - 1) for j in range(R)] for p, r in zip(prompt_ids, responses)]
    )
    return {
        "input_ids": pad_right(seqs, pad_id).to(device),
        "attention_mask": pad_right([[1] * len(s) for s in seqs], 0).to(device),
        "positions": positions.to(device),
        "targets": pad_right(responses, pad_id).to(device),
        "mask": pad_right([[1] * len(r) for r in responses], 0).float().to(device),
    }


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
    hook = (
        inner.get_output_embeddings().register_forward_pre_hook(lambda m, args: hidden.append(args[0]))
        if value_head
        else None
    )
    T, pos = seqs["input_ids"].shape[1], seqs["positions"]  # pos: (N, R)
    extra = {}
    if "logits_to_keep" in inspect.signature(inner.forward).parameters:
        keep = T - int(pos.min())  # no logits (nor value-head inputs) for the prompts' positions
        extra, pos = {"logits_to_keep": keep}, pos - (T - keep)
    try:
        with fp32_output_layer(model):  # (after the value head's hook: that one sees every position)
            logits = model(
                input_ids=seqs["input_ids"], attention_mask=seqs["attention_mask"], use_cache=False, **extra
            ).logits  # (N, K, V) fp32
    finally:
        if hook is not None:
            hook.remove()
    picked = logits.gather(1, pos[..., None].expand(-1, -1, logits.shape[-1])).float() / temperature  # (N, R, V)
    logp_all = picked - picked.logsumexp(-1, keepdim=True)  # not log_softmax: see logprobs.token_logps
    out = {
        "logps": logp_all.gather(-1, seqs["targets"][..., None]).squeeze(-1),
        "entropy": -(logp_all.exp() * logp_all).sum(-1).detach(),
    }
    if value_head:
        h = hidden[0].gather(1, pos[..., None].expand(-1, -1, hidden[0].shape[-1]))  # (N, R, H)
        out["values"] = inner.value_head(h.to(inner.value_head.weight.dtype)).squeeze(-1).float()
    return out


class RLStep:
    """step(policy, batch of prompts) -> (losses (B,), metrics (B,)): rollout, then PPO / RLOO loss."""

    def __init__(self, cfg, reference, reward_fn, tokenizer):
        self.cfg, self.reference, self.reward_fn, self.tokenizer = cfg, reference, reward_fn, tokenizer
        self.ppo = cfg.algorithm == "ppo"
        self.k = cfg.num_samples_per_prompt
        self.kl = KLController(cfg.kl_coef, cfg.target_kl if cfg.adaptive_kl else None, cfg.kl_horizon)
        self.calls = 0  # training micro-batches seen: which rollout is in use, and when to make one
        self.rollouts = {}  # micro-batch index within an optimizer step -> its rollout
        self.kl_sums = [0.0, 0]  # this optimizer step's new rollouts: sum of sequence KLs, count

    # --- rollouts -----------------------------------------------------------------------------------------

    @torch.no_grad()
    def rollout(self, model, batch) -> dict:
        cfg, tok, k = self.cfg, self.tokenizer, self.k
        policy = unwrap(model)
        prompt_ids = [p for p in batch["prompt_ids"] for _ in range(k)]  # N = B k
        prompts = [p for p in batch["prompts"] for _ in range(k)]
        responses = sample_responses(
            policy, tok, prompt_ids, cfg.max_new_tokens, cfg.temperature, top_p=1.0, top_k=0, batch_size=len(prompt_ids)
        )
        device = next(policy.parameters()).device
        texts = [tok.decode(r, skip_special_tokens=True) for r in responses]
        scores = torch.tensor([float(s) for s in self.reward_fn(prompts, texts)], device=device)  # (N,)
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
            sequence_rewards = (rewards * mask).sum(-1)  # r - beta KL, (N,)
            advantages = rloo_advantages(sequence_rewards.view(-1, k)).view(-1, 1) * mask
            returns = None
        if cfg.whiten_advantages:
            advantages = masked_whiten(advantages, mask)
        out = {
            **seqs,
            "old_logps": own["logps"],
            "advantages": advantages,
            "scores": scores,
            "kl": kl.sum(-1),
            "kl_coef": torch.full_like(scores, self.kl.value),
            "lengths": mask.sum(-1),
        }
        if self.ppo:
            out.update(old_values=own["values"], returns=returns)
        return out

    def per_prompt(self, x):
        return x.view(-1, self.k).mean(-1)  # (B k,) -> (B,)

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
        policy_loss, clipfrac, approx_kl = ppo_policy_loss(
            now["logps"], r["old_logps"], r["advantages"], mask, self.cfg.cliprange
        )
        loss = policy_loss
        metrics = {"policy_loss": policy_loss.detach(), "clipfrac": clipfrac, "approx_kl": approx_kl}
        if self.ppo:
            value_loss, value_clipfrac = ppo_value_loss(
                now["values"], r["old_values"], r["returns"], mask, self.cfg.cliprange_value
            )
            loss = loss + self.cfg.vf_coef * value_loss
            metrics.update(value_loss=value_loss.detach(), value_clipfrac=value_clipfrac)
        metrics.update(
            reward=r["scores"],
            kl=r["kl"],
            non_score_reward=-r["kl_coef"] * r["kl"],
            kl_coef=r["kl_coef"],
            entropy=masked_mean(now["entropy"], mask, -1),
            response_length=r["lengths"],
        )
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
        total = all_reduce_sum(torch.tensor(self.kl_sums, dtype=torch.float64))
        if total[1] > 0:
            self.kl.update(float(total[0] / total[1]), int(total[1]))

    def state_dict(self) -> dict:
        return {"kl_coef": self.kl.value, "calls": self.calls}

    def load_state_dict(self, state: dict):
        self.kl.value, self.calls = state["kl_coef"], state["calls"]

    def save_state(self, directory):
        """The rollouts still in use (ppo_epochs > 1) are part of the run's state."""
        if self.rollouts:
            torch.save(
                {str(m): {k: v.cpu() for k, v in r.items()} for m, r in self.rollouts.items()},
                Path(directory) / "rollouts.pt",
            )

    def load_state(self, directory):
        path = Path(directory) / "rollouts.pt"
        if path.is_file():
            device = next(unwrap(self.reference).parameters()).device
            saved = torch.load(path, weights_only=True)
            self.rollouts = {int(m): {k: v.to(device) for k, v in r.items()} for m, r in saved.items()}
