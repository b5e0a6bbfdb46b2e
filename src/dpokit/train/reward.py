"""`dpokit rm`: a Bradley-Terry reward model r_phi(x, y), the second stage of the classic RLHF pipeline
(Stiennon et al., 2020; Ouyang et al., 2022) and the reward that `dpokit rl` maximises.

The model is the SFT model (or any causal LM) with its language-model head replaced by a scalar head:
transformers' `AutoModelForSequenceClassification` with num_labels=1 (the head starts random). On
preference pairs (x, y_w, y_l) it minimises the negative log-likelihood of the Bradley-Terry model
(DPO paper, Eq. 2),

    L_R = -E[ log sigmoid( r_phi(x, y_w) - r_phi(x, y_l) ) ]
          (+ center_rewards_coefficient * E[(r_phi(x, y_w) + r_phi(x, y_l))^2], Eisenstein et al., 2023)

on the same data, tokenization and batches as `dpokit dpo` (chosen and rejected in one forward pass).
Metrics: `loss`, `accuracy` (r(y_w) > r(y_l); a tie counts half), `rewards/chosen`,
`rewards/rejected`, `rewards/margins`; `eval/accuracy` is the held-out pairwise accuracy. The output
directory loads with `AutoModelForSequenceClassification.from_pretrained` and serves as `reward=rm:DIR`
(reward_model.py tells where the reward is read).
"""

from dataclasses import dataclass
from functools import partial

from dpokit import models
from dpokit.config import TrainConfig, opt
from dpokit.data.batch import collate_padded
from dpokit.data.load import load_pairs
from dpokit.data.tokenize import tokenize_dataset
from dpokit.report import log, plot_metrics
from dpokit.reward_model import bradley_terry_loss, load_reward_model, sequence_rewards
from dpokit.train import loop
from dpokit.train.stage import enable_gradient_checkpointing, refuse, train_and_eval


@dataclass
class RewardConfig(TrainConfig):
    """Bradley-Terry reward model r(x, y): a causal LM with a scalar head, trained on preference pairs."""

    output_dir: str = opt("runs/rm", "where the reward model, config, metrics and plots are written")
    learning_rate: float = opt(1e-5, "peak learning rate")
    dataset: str = opt(None, "preference pairs, in any format `dpokit dpo` reads")
    center_rewards_coefficient: float = opt(0.0, "weight of the auxiliary (r_w + r_l)^2 term that keeps rewards "
                                            "centred on 0 (Eisenstein et al., 2023); 0: the plain Bradley-Terry loss")


class RewardStep:
    """step(model, batch) -> (losses (B,), metrics) on the padded pair layout: rows 0..B-1 chosen, B..2B-1
    rejected."""

    def __init__(self, cfg):
        self.center = cfg.center_rewards_coefficient

    def __call__(self, model, batch):
        B = batch["num_examples"]
        rewards = sequence_rewards(model, batch["input_ids"], batch["attention_mask"])     # (2B,)
        chosen, rejected = rewards[:B], rewards[B:]
        losses = bradley_terry_loss(chosen, rejected)
        if self.center:
            losses = losses + self.center * (chosen + rejected) ** 2
        margins = (chosen - rejected).detach()
        metrics = {"accuracy": (margins > 0).float() + 0.5 * (margins == 0).float(),
                   "rewards/chosen": chosen.detach(), "rewards/rejected": rejected.detach(),
                   "rewards/margins": margins}
        return losses, metrics


def load_split(cfg, tokenizer, source, split) -> list:
    rows, label, fmt = load_pairs(source, split)
    examples, stats = tokenize_dataset(tokenizer, rows, label, cfg.max_length, cfg.max_prompt_length,
                                       cfg.truncation_mode)
    log.info("%s (%s): %s", label, fmt, stats.summary())
    return examples


def run(cfg):
    """`dpokit rm`: everything that can fail on bad input happens before output_dir is touched."""
    refuse(cfg, "rm", ("padding_free", "prefix_sharing", "logprob_chunk_size", "use_lora"))
    ranks = loop.setup_distributed()
    loop.set_seed(cfg.seed)
    loop.check_output_dir(cfg)
    tokenizer = models.load_tokenizer(cfg.model, cfg.trust_remote_code)
    train_examples, eval_examples = train_and_eval(cfg, partial(load_split, cfg, tokenizer))
    model = load_reward_model(cfg.model, tokenizer.pad_token_id, cfg.trust_remote_code)
    loop.check_output_dir(cfg, sum(p.numel() for p in model.parameters()))
    if cfg.disable_dropout:
        models.disable_dropout(model)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    collate = partial(collate_padded, pad_id=tokenizer.pad_token_id)
    trained = loop.train(cfg, model, tokenizer, RewardStep(cfg), train_examples, eval_examples, collate, ranks,
                         save_fn=partial(_save, tokenizer=tokenizer))
    if ranks.main:
        plot_metrics(f"{cfg.output_dir}/metrics.jsonl", f"{cfg.output_dir}/training_curves.png",
                     ("loss", "accuracy", "rewards/margins"))
        log.info("saved the reward model to %s (use it as reward=rm:%s)", cfg.output_dir, cfg.output_dir)
    return trained


def _save(model, out_dir, tokenizer, final=False):
    model = getattr(model, "module", model)  # unwrap DDP
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return model
