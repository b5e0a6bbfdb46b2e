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

import torch

from dpokit import models
from dpokit.config import TrainConfig, opt
from dpokit.data.batch import pad_right
from dpokit.data.layouts import CHOSEN, PROMPT, Block, assemble
from dpokit.data.prompts import load_demonstrations, tokenize_demonstrations
from dpokit.logprobs import chunked_token_logps, model_inputs, response_targets, token_logps_from_logits
from dpokit.report import log, plot_metrics
from dpokit.train import loop
from dpokit.train.stage import enable_gradient_checkpointing, refuse, train_and_eval


@dataclass
class SFTConfig(TrainConfig):
    """Supervised fine-tuning (NLL of the completion tokens): the pi_SFT that DPO and RLHF start from."""

    output_dir: str = opt("runs/sft", "where the trained model, config, metrics and plots are written")
    learning_rate: float = opt(2e-5, "peak learning rate")
    loss_normalization: str = opt("sequence", "per-example loss: the mean NLL of its completion tokens (every "
                                  "example weighs the same) or their sum (every token weighs the same)",
                                  ["sequence", "sum"])
    dataset: str = opt(None, "demonstrations: prompt+completion, messages (the last assistant "
                                        "turn is the target) or preference rows (chosen is the target)")


def collate_sft(examples: list, pad_id: int, packed: bool = False) -> dict:
    """B examples (prompt_ids, chosen_ids = completion) -> a padded (B, T) batch with a loss_mask over the
    completion tokens, or (packed) one (1, L) row in the layout of data/layouts.py."""
    B = len(examples)
    if packed:
        blocks = []
        for i, e in enumerate(examples):
            b = Block()
            b.add(e.prompt_ids, PROMPT, 0, None, None)
            b.add(e.chosen_ids, CHOSEN, len(e.prompt_ids), len(e.prompt_ids) - 1, i)
            blocks.append(b)
        return assemble(blocks, pad_id, packed=True, layout="packed", num_examples=B)
    seqs = [e.prompt_ids + e.chosen_ids for e in examples]
    input_ids = pad_right(seqs, pad_id)                                               # (B, T)
    attention_mask = pad_right([[1] * len(s) for s in seqs], 0)
    loss_mask = pad_right([[0] * len(e.prompt_ids) + [1] * len(e.chosen_ids) for e in examples], 0)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask,
            "num_examples": B, "num_tokens": int(attention_mask.sum())}


class SFTStep:
    """step(model, batch) -> (losses (B,), metrics): the completion tokens' NLL per example."""

    def __init__(self, cfg):
        self.chunk_size, self.normalization = cfg.logprob_chunk_size, cfg.loss_normalization

    def __call__(self, model, batch):
        B = batch["num_examples"]
        positions, targets, sequences = response_targets(batch)                        # each (M,)
        inputs = model_inputs(model, batch)
        if self.chunk_size is None:
            token_logps = token_logps_from_logits(model, inputs, positions, targets)   # (M,)
        else:
            token_logps = chunked_token_logps(model, inputs, positions, targets, self.chunk_size)
        nll = torch.zeros(B, dtype=torch.float32, device=token_logps.device).index_add(0, sequences, -token_logps)
        n_tokens = torch.bincount(sequences, minlength=B).float()                     # (B,)
        mean_nll = nll / n_tokens
        losses = mean_nll if self.normalization == "sequence" else nll
        # (values, weights): the window's mean is sum(NLL) / sum(tokens), the per-token NLL
        return losses, {"nll": (mean_nll.detach(), n_tokens), "completion_tokens": n_tokens}


def load_split(cfg, tokenizer, source, split) -> list:
    rows, label, fmt = load_demonstrations(source, split)
    examples, stats = tokenize_demonstrations(tokenizer, rows, label, cfg.max_length, cfg.max_prompt_length,
                                              cfg.truncation_mode)
    log.info("%s (%s): %s", label, fmt, stats.summary().replace("pairs", "examples"))
    return examples


def run(cfg):
    """`dpokit sft`: everything that can fail on bad input happens before output_dir is touched."""
    refuse(cfg, "sft", ("prefix_sharing",))
    ranks = loop.setup_distributed()
    loop.set_seed(cfg.seed)
    loop.check_output_dir(cfg)
    tokenizer = models.load_tokenizer(cfg.model, cfg.trust_remote_code)
    train_examples, eval_examples = train_and_eval(cfg, partial(load_split, cfg, tokenizer))
    model = models.load_model(cfg.model, cfg.trust_remote_code)
    loop.check_output_dir(cfg, sum(p.numel() for p in model.parameters()))
    if cfg.disable_dropout:
        models.disable_dropout(model)
    if cfg.use_lora:
        model = models.add_lora(model, cfg)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model, cfg.use_lora)
    collate = partial(collate_sft, pad_id=tokenizer.pad_token_id, packed=cfg.padding_free)
    save = partial(_save, tokenizer=tokenizer)
    trained = loop.train(cfg, model, tokenizer, SFTStep(cfg), train_examples, eval_examples, collate, ranks,
                         save_fn=save)
    if ranks.main:
        plot_metrics(f"{cfg.output_dir}/metrics.jsonl", f"{cfg.output_dir}/training_curves.png", ("loss", "nll"))
        log.info("saved the SFT model to %s (use it as model= and ref_model= of `dpokit dpo`)", cfg.output_dir)
    return trained


def _save(model, out_dir, tokenizer, final=False):
    return models.save_model(model, tokenizer, out_dir, merge_lora=final)
