"""The RLHF step (PPO with a value head and GAE, or RLOO): rollouts from the policy scored by a reward,
then the clipped surrogate on them; see commands/rl.py for the whole method and its metrics."""

import typing
from dataclasses import dataclass
from pathlib import Path

import torch

from dpokit.data.batch import pad_right
from dpokit.data.layouts import PROMPT
from dpokit.logprobs import fp32_output_layer, kept_positions, model_inputs, unwrap
from dpokit.rl_losses import (
    KLController,
    explained_variance,
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


def response_batch(prompt_ids: list, responses: list, pad_id: int, device, k: int = 1, shared: bool = False) -> dict:
    """N = B k (prompt, response) -> the forward's input and, for every response token, where it is predicted.

    `prompt_ids` holds the B prompts, each followed by its k responses in `responses`. Padded layout
    (shared False): N right-padded rows prompt + response, (N, T). Shared layout: one row per prompt,
    [prompt | y_1 | ... | y_k], (B, T): the prompt is computed once for its k samples; each y_i starts at
    position len(prompt) and attends to the prompt and itself only (layouts.prefix_shared_mask), so its
    log-probs equal the padded layout's (tests/test_rl.py checks it to 1e-4).

    `positions` (N, R): the flat index into input_ids.view(-1) of the position whose logits predict
    response token j (clamped past the end of a shorter response), `targets` (N, R), `mask` (N, R)."""
    R = max(len(r) for r in responses)
    targets = pad_right(responses, pad_id)
    mask = pad_right([[1] * len(r) for r in responses], 0).float()
    if not shared:
        rows = [p for p in prompt_ids for _ in range(k)]
        seqs = [p + r for p, r in zip(rows, responses)]
        T = max(len(q) for q in seqs)
        positions = torch.tensor(
            [
                [n * T + len(p) - 1 + min(j, len(r) - 1) for j in range(R)]
                for n, (p, r) in enumerate(zip(rows, responses))
            ]
        )
        batch = {
            "input_ids": pad_right(seqs, pad_id),
            "attention_mask": pad_right([[1] * len(q) for q in seqs], 0),
        }
    else:
        B = len(prompt_ids)
        T = max(len(p) + sum(len(r) for r in responses[b * k : (b + 1) * k]) for b, p in enumerate(prompt_ids))
        input_ids = torch.full((B, T), pad_id, dtype=torch.long)
        position_ids = torch.zeros((B, T), dtype=torch.long)
        sequence_ids = torch.full((B, T), -1, dtype=torch.long)
        segment_ids = torch.full((B, T), -1, dtype=torch.long)
        positions = torch.zeros((B * k, R), dtype=torch.long)
        for b, p in enumerate(prompt_ids):
            P = len(p)
            input_ids[b, :P], position_ids[b, :P], segment_ids[b, :P] = torch.tensor(p), torch.arange(P), PROMPT
            start = P
            for i in range(k):
                n, r = b * k + i, responses[b * k + i]
                span = slice(start, start + len(r))
                input_ids[b, span], position_ids[b, span] = torch.tensor(r), torch.arange(P, P + len(r))
                segment_ids[b, span] = 1 + i  # response i: sees the prompt and itself
                # token 0 is predicted from the last prompt token, token j from the response's token j - 1
                local = [P - 1] + list(range(start, start + len(r) - 1))
                positions[n] = torch.tensor([b * T + local[min(j, len(r) - 1)] for j in range(R)])
                start += len(r)
            sequence_ids[b, :start] = b
        batch = {
            "input_ids": input_ids,
            "position_ids": position_ids,
            "sequence_ids": sequence_ids,
            "segment_ids": segment_ids,
        }
    batch.update(positions=positions, targets=targets, mask=mask)
    return {key: v.to(device) for key, v in batch.items()}


def forward_inputs(model, seqs: dict) -> dict:
    """The model's keyword arguments for a response_batch: padded, or prefix-shared with its 4D mask."""
    if "segment_ids" not in seqs:
        return {"input_ids": seqs["input_ids"], "attention_mask": seqs["attention_mask"]}
    return model_inputs(model, {**seqs, "layout": "prefix_shared"})


def token_stats(model, seqs: dict, temperature: float = 1.0, value_head: bool = False, detach_values=False) -> dict:
    """One forward over a response_batch -> per response token (N, R): `logps` log pi(a_t|s_t) at the
    temperature, `entropy` of pi(.|s_t), and `values` V(s_t) from the value head on the last hidden state
    (on a detached one with `detach_values`: the value loss then trains the head alone).

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
    pos = seqs["positions"]  # (N, R) flat indices
    N, R = pos.shape
    # logits (and value-head inputs) only at the positions that predict response tokens
    keep, rows = kept_positions(model, pos.flatten(), seqs["input_ids"].shape)
    extra = {} if keep is None else {"logits_to_keep": keep}
    try:
        with fp32_output_layer(model):  # (after the value head's hook: that one sees the head's real input)
            logits = model(**forward_inputs(model, seqs), use_cache=False, **extra).logits  # (rows, K, V) fp32
    finally:
        if hook is not None:
            hook.remove()
    picked = logits.flatten(0, 1)[rows].view(N, R, -1).float() / temperature  # (N, R, V)
    logp_all = picked - picked.logsumexp(-1, keepdim=True)  # not log_softmax: see logprobs.token_logps
    out = {
        "logps": logp_all.gather(-1, seqs["targets"][..., None]).squeeze(-1),
        "entropy": -(logp_all.exp() * logp_all).sum(-1).detach(),
    }
    if value_head:
        h = hidden[0].flatten(0, 1)[rows].view(N, R, -1)  # (N, R, H)
        h = h.detach() if detach_values else h
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
        """Sample k responses per prompt, score them, and their advantages from the policy's and the
        reference's log-probs (no grad: for a rollout reused over ppo_epochs, or held-out prompts)."""
        drawn = self.draw(model, batch)
        own = token_stats(unwrap(model), drawn["seqs"], self.cfg.temperature, value_head=self.ppo)
        return self.advantages(drawn, own)

    @torch.no_grad()
    def draw(self, model, batch) -> dict:
        """The rollout's samples, their scores, and the reference's token log-probs."""
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
        seqs = response_batch(batch["prompt_ids"], responses, tok.pad_token_id, device, k, cfg.prefix_sharing)
        ref = token_stats(self.reference, seqs, cfg.temperature)
        return {"seqs": seqs, "scores": scores, "finished": finished, "ref_logps": ref["logps"]}

    @torch.no_grad()
    def advantages(self, drawn: dict, own: dict) -> dict:
        """A drawn rollout and the policy's token stats on it (own: logps, and values for PPO) -> the
        rollout the loss uses: KL-penalised rewards, advantages (and returns), diagnostics."""
        cfg, k = self.cfg, self.k
        seqs, scores, finished = drawn["seqs"], drawn["scores"], drawn["finished"]
        mask = seqs["mask"]
        own = {key: v.detach() for key, v in own.items()}
        rewards, kl = kl_penalised_rewards(scores, own["logps"], drawn["ref_logps"], mask, self.kl.value)
        N = len(scores)
        diagnostics = {
            "finished": finished.float(),
            # the rollout's own spread: how much of the reward's change between steps is noise
            "reward_se": torch.full_like(scores, float(scores.std() / N**0.5) if N > 1 else 0.0),
        }
        if self.ppo:
            advantages, returns = gae(rewards, own["values"], mask, cfg.gamma, cfg.lam)
            token_advantages = advantages
            ev = explained_variance(own["values"], returns, mask)
            diagnostics["value_explained_variance"] = torch.full_like(scores, ev)
        else:
            sequence_rewards = (rewards * mask).sum(-1)  # r - beta KL, (N,)
            advantages = rloo_advantages(sequence_rewards.view(-1, k)).view(-1, 1) * mask
            token_advantages, returns = advantages, None
        # before whitening: the scale the policy gradient would have without it
        adv_mean = masked_mean(token_advantages, mask)
        adv_std = masked_mean((token_advantages - adv_mean) ** 2, mask).sqrt()
        diagnostics.update(
            advantage_mean=torch.full_like(scores, float(adv_mean)),
            advantage_std=torch.full_like(scores, float(adv_std)),
        )
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
            **diagnostics,
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
        cfg = self.cfg
        ga = cfg.gradient_accumulation_steps
        micro, optimizer_step = self.calls % ga, self.calls // ga
        self.calls += 1
        if micro == 0:
            self.kl_sums = [0.0, 0]
        # critic warm-up (PPO): the value head alone learns, on the trunk's detached features; the policy stays pi_ref
        warming = self.ppo and optimizer_step < cfg.critic_warmup_steps
        now, fresh = None, True
        if cfg.ppo_epochs == 1:  # a fresh rollout used once: its "old" log-probs are this very forward's
            # (the no-grad pass would repeat the same forward bit for bit: tests/test_rl.py), so the
            # policy's forward runs once, with grad, instead of twice
            drawn = self.draw(model, batch)
            now = token_stats(model, drawn["seqs"], cfg.temperature, value_head=self.ppo, detach_values=warming)
            self.rollouts[micro] = self.advantages(drawn, now)
        elif optimizer_step % cfg.ppo_epochs == 0 or micro not in self.rollouts:
            self.rollouts[micro] = self.rollout(model, batch)
        else:
            fresh = False
        r = self.rollouts[micro]
        if fresh:
            self.kl_sums[0] += float(r["kl"].sum())
            self.kl_sums[1] += len(r["kl"])
        mask = r["mask"]
        if now is None:
            now = token_stats(model, r, cfg.temperature, value_head=self.ppo, detach_values=warming)
        policy_loss, clipfrac, approx_kl = ppo_policy_loss(
            now["logps"], r["old_logps"], r["advantages"], mask, cfg.cliprange, cfg.loss_aggregation
        )
        loss = policy_loss * (0.0 if warming else 1.0)
        metrics = {"policy_loss": policy_loss.detach(), "clipfrac": clipfrac, "approx_kl": approx_kl}
        if self.ppo:
            value_loss, value_clipfrac = ppo_value_loss(
                now["values"], r["old_values"], r["returns"], mask, cfg.cliprange_value, cfg.loss_aggregation
            )
            loss = loss + cfg.vf_coef * value_loss
            metrics.update(
                value_loss=value_loss.detach(),
                value_clipfrac=value_clipfrac,
                value_explained_variance=r["value_explained_variance"],
            )
        metrics.update(
            reward=r["scores"],
            reward_se=r["reward_se"],
            kl=r["kl"],
            non_score_reward=-r["kl_coef"] * r["kl"],
            kl_coef=r["kl_coef"],
            entropy=masked_mean(now["entropy"], mask, -1),
            response_length=r["lengths"],
            finished=r["finished"],
            advantage_mean=r["advantage_mean"],
            advantage_std=r["advantage_std"],
        )
        return self.per_prompt(loss), {k: self.per_prompt(v) for k, v in metrics.items()}

    @torch.no_grad()
    def evaluate(self, model, batch):
        """Held-out prompts: sample, score, KL to the reference; seeded and without touching the training RNG."""
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.cfg.seed)
            r = self.rollout(model, batch)
        metrics = {"reward": r["scores"], "kl": r["kl"], "response_length": r["lengths"], "finished": r["finished"]}
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
