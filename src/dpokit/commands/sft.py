"""`dpokit sft`: supervised fine-tuning on demonstrations, the first stage of the RLHF pipeline
(Ouyang et al., 2022; Stiennon et al., 2020) and the pi_SFT that DPO starts from and uses as pi_ref
(Rafailov et al., 2023, Sec. 4: "when available, we initialize pi_ref = pi_SFT").

Data (data/prompts.py): prompt + completion (strings, or messages rendered with the chat template),
`messages` conversations whose last assistant turn is the target, or preference rows whose chosen
response is the target. Prompt and completion are tokenized exactly as DPO tokenizes prompt and
response (boundary-exact, one EOS at the end of the completion), so the SFT model is trained on the
very tokens DPO later scores.

Loss: negative log-likelihood of the completion tokens only (prompt and padding tokens carry no loss),

    loss_i = -(1 / |y_i|) sum_t log pi(y_i,t | x_i, y_i,<t)      loss_normalization=sequence (default)
    loss_i = -sum_t log pi(y_i,t | x_i, y_i,<t)                   loss_normalization=sum

The shared loop averages per-example losses over the examples of an optimizer step, so with either
choice k accumulated micro-batches give exactly the gradient of one batch of k times the size:
`sequence` weighs every example equally (a per-sequence mean); `sum` weighs every token equally (its
step loss is the step's total NLL / examples, i.e. the per-token mean over the step's response tokens
scaled by their mean count per example). A per-token mean computed inside each micro-batch would not
accumulate exactly, which is why neither option is that. The logged `nll` is always the per-token
mean NLL over the logging window's response tokens (exp(nll) is the perplexity).
"""

from dataclasses import dataclass
from functools import partial

from dpokit import models
from dpokit.commands import prepare as prep
from dpokit.config import TrainConfig, opt
from dpokit.data.prompts import load_demonstrations, tokenize_demonstrations
from dpokit.report import log
from dpokit.train.sft_step import SFTStep, collate_sft


@dataclass
class SFTConfig(TrainConfig):
    """Supervised fine-tuning (NLL of the completion tokens): the pi_SFT that DPO and RLHF start from."""

    output_dir: str = opt("runs/sft", "where the trained model, config, metrics and plots are written")
    learning_rate: float = opt(2e-5, "peak learning rate")
    loss_normalization: str = opt(
        "sequence",
        "per-example loss: the mean NLL of its completion tokens (every "
        "example weighs the same) or their sum (every token weighs the same)",
        ["sequence", "sum"],
    )
    dataset: str = opt(
        None,
        "demonstrations: prompt+completion, messages (the last assistant "
        "turn is the target) or preference rows (chosen is the target)",
    )

    def check(self):
        prep.refuse(self, "sft", ("prefix_sharing",))


def load_split(cfg, tokenizer, source, split) -> list:
    rows, label, fmt = load_demonstrations(source, split)
    examples, stats = tokenize_demonstrations(
        tokenizer, rows, label, cfg.max_length, cfg.max_prompt_length, cfg.truncation_mode
    )
    log.info("%s (%s): %s", label, fmt, stats.summary().replace("pairs", "examples"))
    return examples


def sft(config=None, *, model=None, tokenizer=None, train_dataset=None, eval_dataset=None, callbacks=()):
    """Supervised fine-tuning; the arguments are those of dpokit.dpo (no reference). Returns a TrainResult."""
    cfg = prep.resolve_config(SFTConfig, config, model=model, train_dataset=train_dataset, eval_dataset=eval_dataset)
    run = prep.prepare(
        cfg, load_split, model=model, tokenizer=tokenizer, train_dataset=train_dataset, eval_dataset=eval_dataset
    )
    if cfg.use_lora and not models.is_peft(run.model):
        run.model = models.add_lora(run.model, cfg)
    if cfg.gradient_checkpointing:
        prep.enable_gradient_checkpointing(run.model, cfg.use_lora)
    collate = partial(collate_sft, pad_id=run.tokenizer.pad_token_id, packed=cfg.padding_free)
    result = prep.train(
        cfg, run, SFTStep(cfg), collate, callbacks=callbacks, plot_keys=("loss", "nll"), what="SFT model"
    )
    if run.ranks.main:
        log.info("use it as model= and ref_model= of `dpokit dpo`")
    return result
