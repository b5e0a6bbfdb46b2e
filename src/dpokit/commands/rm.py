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

from dpokit.commands import prepare as prep
from dpokit.config import TrainConfig, opt
from dpokit.data.batch import collate_padded
from dpokit.reward_model import load_reward_model
from dpokit.train.rm_step import RewardStep


@dataclass
class RMConfig(TrainConfig):
    """Bradley-Terry reward model r(x, y): a causal LM with a scalar head, trained on preference pairs."""

    output_dir: str = opt("runs/rm", "where the reward model, config, metrics and plots are written")
    learning_rate: float = opt(1e-5, "peak learning rate")
    dataset: str = opt(None, "preference pairs, in any format `dpokit dpo` reads")
    center_rewards_coefficient: float = opt(
        0.0,
        "weight of the auxiliary (r_w + r_l)^2 term that keeps rewards "
        "centred on 0 (Eisenstein et al., 2023); 0: the plain Bradley-Terry loss",
    )

    def check(self):
        prep.refuse(self, "rm", ("padding_free", "prefix_sharing", "logprob_chunk_size", "use_lora"))


def rm(config=None, *, model=None, tokenizer=None, train_dataset=None, eval_dataset=None, callbacks=()):
    """Train a reward model; `model` may be a loaded AutoModelForSequenceClassification (num_labels=1).
    The other arguments are those of dpokit.dpo. Returns a TrainResult."""
    cfg = prep.resolve_config(RMConfig, config, model=model, train_dataset=train_dataset, eval_dataset=eval_dataset)
    run = prep.prepare(
        cfg,
        prep.load_pair_split,
        model=model,
        tokenizer=tokenizer,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        load_model=lambda name, trust: load_reward_model(name, None, trust),
    )
    run.model.config.pad_token_id = run.tokenizer.pad_token_id  # transformers reads the reward from it
    if cfg.gradient_checkpointing:
        prep.enable_gradient_checkpointing(run.model)
    collate = partial(collate_padded, pad_id=run.tokenizer.pad_token_id)
    return prep.train(
        cfg,
        run,
        RewardStep(cfg),
        collate,
        callbacks=callbacks,
        plot_keys=("loss", "accuracy", "rewards/margins"),
        what=f"reward model (reward=rm:{cfg.output_dir})",
    )
