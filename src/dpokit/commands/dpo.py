"""`dpokit dpo` / `dpokit.dpo()`: Direct Preference Optimization (Rafailov et al., 2023), or any loss of
losses.py, on preference pairs (`kto` on unpaired rows; `plackett_luce`, or any pairwise loss with
`pairs_from_ranking`, on ranked lists), on the shared loop."""

import dataclasses
import typing
from dataclasses import dataclass
from functools import partial

from dpokit import models
from dpokit.commands import prepare as prep
from dpokit.config import TrainConfig, opt
from dpokit.data.layouts import collate_for, layout_name
from dpokit.data.rankings import collate_rankings, load_rankings, tokenize_rankings
from dpokit.errors import UserError
from dpokit.logprobs import resolve_chunk_size
from dpokit.losses import LOSSES, requirements
from dpokit.ranking_losses import PAIRS_FROM_RANKING
from dpokit.report import log
from dpokit.train import kto, refcache
from dpokit.train.dpo_step import DPOStep, collate_with_reference
from dpokit.train.ranking_step import RankingStep

# the registry of losses.py is the one list of losses: choices, help and docs/losses.md (a test) read it
LOSS_TYPES = [*LOSSES, "kto", "plackett_luce"]
LOSS_PAPERS = "; ".join(f"{name}: {spec.formula} ({spec.paper})" for name, spec in LOSSES.items())


@dataclass
class DPOConfig(TrainConfig):
    """Direct Preference Optimization (Rafailov et al., 2023)."""

    accepts_trl_keys = True  # TRL's DPO YAML keys are translated (config.load_config, trl_keys.py)
    output_dir: str = opt("runs/dpo", "where the trained model, config, metrics and plots are written")
    learning_rate: float = opt(1e-6, "peak learning rate (the DPO paper: 1e-6)")
    # the fastest exact layout by default (docs/layouts.md: every layout equals the padded one to 1e-4)
    padding_free: bool = opt(
        True,
        "pack the batch's sequences into one row (no padding computed), attention kept within each "
        "sequence; false: the padded layout",
    )
    prefix_sharing: bool = opt(
        True,
        "one [prompt | chosen | rejected] sequence per pair: the prompt is computed once (needs "
        "attn_implementation sdpa or eager); false: prompt computed with each response",
    )
    logprob_chunk_size: typing.Optional[int] = opt(
        0,
        "compute response-token log-probs in chunks of this many tokens (the full tokens x vocabulary "
        "logits never exist); 0: picked from the vocabulary size (off for use_weighting or a head that "
        "is not a plain nn.Linear); null: off",
    )
    max_tokens_per_batch: typing.Optional[int] = opt(
        None,
        "token-budget micro-batches instead of per_device_train_batch_size pairs: pairs of similar length "
        "grouped so that each micro-batch holds at most this many tokens in the batch layout (padding "
        "included); every pair still weighs the same in the loss; a pair longer than the budget is an error",
    )
    beta: float = opt(0.1, "KL strength beta: implicit reward = beta * log(pi / pi_ref)")
    label_smoothing: float = opt(0.0, "probability that a preference label is flipped (conservative DPO); 0 = DPO")
    loss_type: typing.List[str] = opt(
        ["sigmoid"],
        "preference loss, or several to add up (e.g. sigmoid,sft = "
        "RPO); see docs/losses.md. `kto` takes unpaired data (prompt, "
        f"completion, label; KTO, arXiv 2402.01306); `plackett_luce` takes ranked lists (prompt, "
        "completions, ranks or scores; the DPO paper's appendix A.3). "
        f"{LOSS_PAPERS}",
        LOSS_TYPES,
    )
    loss_weights: typing.Optional[typing.List[float]] = opt(None, "weight of each loss in loss_type (default: all 1)")
    reference_free: bool = opt(
        False, "a uniform reference (log pi_ref = 0), as in the original DPO code; no reference model is loaded"
    )
    ipo_length_normalize: bool = opt(False, "ipo on per-token average log-ratios (TRL) instead of the paper's sums")
    simpo_gamma: float = opt(0.5, "SimPO target reward margin gamma")
    discopop_tau: float = opt(0.05, "DiscoPOP temperature tau")
    f_divergence_type: str = opt(
        "reverse_kl",
        "f-DPO (arXiv 2309.16240): the divergence to pi_ref that the sigmoid loss regularises with (reverse_kl = DPO)",
        ["reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"],
    )
    f_alpha_divergence_coef: float = opt(1.0, "f-DPO alpha of alpha_divergence (> 0; the paper: in (0, 1))")
    use_weighting: bool = opt(
        False, "WPO (arXiv 2406.11827): weight each pair's loss by w(x,y_w) w(x,y_l) from the policy's probabilities"
    )
    ld_alpha: typing.Optional[float] = opt(
        None, "LD-DPO (arXiv 2409.06411): weight in [0, 1] of the longer response's tokens past the shorter's length"
    )
    rpo_alpha: typing.Optional[float] = opt(
        None, "RPO (arXiv 2404.19733): add alpha * per-token NLL of the chosen response (= loss_type ...,sft)"
    )
    pairs_from_ranking: typing.Optional[str] = opt(
        None,
        "train a pairwise loss on ranked lists (prompt, completions, ranks or scores): the pairs each list "
        "gives, all_pairs (every two of different rank), best_vs_rest or best_vs_worst; a list's loss is the "
        "sum over its pairs, its prompt computed once (see docs/losses.md); null: the data are pairs",
        list(PAIRS_FROM_RANKING),
    )
    desirable_weight: float = opt(1.0, "KTO weight lambda_D of desirable examples")
    undesirable_weight: float = opt(1.0, "KTO weight lambda_U of undesirable examples")
    ref_sync_steps: int = opt(0, "TR-DPO: every this many steps pi_ref <- alpha pi + (1 - alpha) pi_ref (0: off)")
    ref_sync_alpha: float = opt(0.6, "TR-DPO mixing weight alpha (1: copy the policy)")
    ref_model: typing.Optional[str] = opt(
        None,
        "reference model pi_ref (default: a frozen copy of `model`; with "
        "use_lora, the base model with adapters disabled)",
    )
    precompute_ref_log_probs: bool = opt(
        False,
        "one pass of the reference over the data before training, cached "
        "on disk under a fingerprint of weights, tokenizer, data and settings and "
        "reused by later runs; no reference model in memory while training",
    )

    @property
    def ranked(self) -> bool:
        """Whether the data are ranked lists (data/rankings.py) rather than pairs."""
        return self.loss_type == ["plackett_luce"] or self.pairs_from_ranking is not None

    def check(self):
        if self.max_tokens_per_batch is not None and self.max_tokens_per_batch < 1:
            raise UserError(f"key 'max_tokens_per_batch': must be at least 1, got {self.max_tokens_per_batch}")
        if self.max_tokens_per_batch is not None and self.loss_type == ["kto"]:
            raise UserError("key 'max_tokens_per_batch': for paired losses, not kto (its batches pair examples)")
        if "plackett_luce" in self.loss_type and len(self.loss_type) > 1:
            raise UserError(
                "key 'loss_type': plackett_luce is a loss on whole rankings and cannot be combined with other "
                "losses (to add pairwise ones, train them with pairs_from_ranking)"
            )
        if self.loss_type == ["plackett_luce"] and self.pairs_from_ranking is not None:
            raise UserError("key 'pairs_from_ranking': plackett_luce trains on the whole ranking, not on pairs")
        if self.ranked:
            what = "plackett_luce" if self.loss_type == ["plackett_luce"] else "pairs_from_ranking"
            for key, on in (
                ("use_weighting", self.use_weighting),
                ("ld_alpha", self.ld_alpha is not None),
                ("precompute_ref_log_probs", self.precompute_ref_log_probs),
                ("max_tokens_per_batch", self.max_tokens_per_batch is not None),  # (budgets count pair layouts)
                ("label_smoothing", self.label_smoothing and self.loss_type == ["plackett_luce"]),
                ("rpo_alpha", self.rpo_alpha is not None and self.loss_type == ["plackett_luce"]),
                ("loss_type", self.loss_type == ["kto"]),
            ):
                if on:
                    raise UserError(f"key '{key}': not supported on ranked lists ({what})")
        if not self.f_alpha_divergence_coef > 0:
            raise UserError(f"key 'f_alpha_divergence_coef': must be > 0, got {self.f_alpha_divergence_coef}")
        if self.f_divergence_type != "reverse_kl" and "sigmoid" not in self.loss_type:
            raise UserError("key 'f_divergence_type': applies to the sigmoid loss; add sigmoid to loss_type")
        if self.ld_alpha is not None and not 0.0 <= self.ld_alpha <= 1.0:
            raise UserError(f"key 'ld_alpha': must be in [0, 1], got {self.ld_alpha}")
        if self.rpo_alpha is not None and not self.rpo_alpha >= 0:
            raise UserError(f"key 'rpo_alpha': must be >= 0, got {self.rpo_alpha}")
        if self.loss_type == ["kto"] and (
            self.use_weighting or self.ld_alpha is not None or self.rpo_alpha is not None
        ):
            raise UserError("keys 'use_weighting', 'ld_alpha', 'rpo_alpha': for paired losses, not kto")
        if self.use_weighting and self.logprob_chunk_size:  # (0, automatic, turns itself off for WPO)
            raise UserError("key 'use_weighting': WPO's weights need full logits; set logprob_chunk_size to null")
        if self.ld_alpha is not None and (
            self.rpo_alpha is not None or not all(LOSSES.get(t) and LOSSES[t].needs_reference for t in self.loss_type)
        ):
            raise UserError(
                "key 'ld_alpha': LD-DPO reshapes the log-ratios of losses with a reference; it cannot be "
                "combined with rpo_alpha or with reference-free losses (sft, simpo, orpo)"
            )
        if self.ld_alpha is not None and self.precompute_ref_log_probs:
            raise UserError(
                "key 'ld_alpha': cannot be combined with precompute_ref_log_probs (the cache holds whole-sequence "
                "sums, LD-DPO needs the reference's log-probs split at each pair's public length)"
            )
        if self.loss_weights is not None and len(self.loss_weights) != len(self.loss_type):
            raise UserError(
                f"key 'loss_weights': {len(self.loss_weights)} weights for {len(self.loss_type)} loss types"
            )
        if "kto" in self.loss_type and len(self.loss_type) > 1:
            raise UserError("key 'loss_type': kto trains on unpaired data and cannot be combined with other losses")
        if self.loss_type == ["kto"] and self.reference_free:
            raise UserError("key 'reference_free': not supported with kto (its reference point is a KL to pi_ref)")
        if self.loss_type == ["kto"] and self.precompute_ref_log_probs:
            raise UserError("key 'precompute_ref_log_probs': not supported with kto (its KL pairs depend on the batch)")
        if self.precompute_ref_log_probs and self.ref_sync_steps:
            raise UserError(
                "key 'precompute_ref_log_probs': cannot be combined with ref_sync_steps (TR-DPO moves the reference)"
            )
        if self.use_lora and not self.ref_model and self.ref_sync_steps:
            raise UserError(
                "key 'ref_sync_steps': TR-DPO moves the reference, so with use_lora it needs a "
                "separate ref_model (the default reference is the adapters' own base model)"
            )


def resolve_layout(cfg, policy):
    """cfg with logprob_chunk_size 0 (automatic) replaced by the size for this policy's vocabulary, or by
    None (full logits) where chunking cannot apply: WPO's weights, a LoRA adapter on lm_head, a head
    that is not a plain nn.Linear. Done once, before the reference cache keys on it."""
    if cfg.logprob_chunk_size != 0:
        return cfg
    lora_head = cfg.use_lora and any("lm_head" in m for m in cfg.lora_target_modules)
    chunk = None if cfg.use_weighting or lora_head else resolve_chunk_size(policy, 0)
    return dataclasses.replace(cfg, logprob_chunk_size=chunk)


def load_split(cfg, tokenizer, source, split) -> list:
    """Tokenized pairs (or, for kto, unpaired examples) of one split of a source."""
    if cfg.loss_type == ["kto"]:
        return kto.load_kto_split(cfg, tokenizer, source, split)
    if cfg.ranked:
        rows, label, fmt = load_rankings(source, split)
        examples, stats = tokenize_rankings(
            tokenizer, rows, label, cfg.max_length, cfg.max_prompt_length, cfg.truncation_mode
        )
        log.info("%s (%s, ranked): %s", label, fmt, stats.summary())
        return examples
    try:
        return prep.load_pair_split(cfg, tokenizer, source, split)
    except UserError as e:
        if "field 'chosen': missing" in str(e) and "'completions'" in str(e):  # ranked rows read as pairs
            raise UserError(
                f"{e}; rows of prompt, completions and ranks/scores are ranked lists: train them with "
                f"loss_type=plackett_luce or pairs_from_ranking=all_pairs|best_vs_rest|best_vs_worst"
            ) from None
        raise


def dpo(
    config=None, *, model=None, ref_model=None, tokenizer=None, train_dataset=None, eval_dataset=None, callbacks=()
):
    """Train a policy with DPO (or `loss_type`) and save it to `output_dir`.

    config: a DPOConfig, a dict of its keys, or a YAML path (the keys, defaults and checks of
    `dpokit dpo`). model / ref_model / tokenizer: loaded `transformers` objects in place of the `model`
    / `ref_model` keys; train_dataset / eval_dataset: a `datasets.Dataset` or `DatasetDict`, a list of
    row dicts, or a path, in place of `dataset` / `eval_dataset`. callbacks: train.callbacks.Callback
    objects. Returns a TrainResult (.model, .metrics, .output_dir). Bad input raises UserError before
    anything is written.
    """
    cfg = prep.resolve_config(
        DPOConfig, config, model=model, ref_model=ref_model, train_dataset=train_dataset, eval_dataset=eval_dataset
    )
    run = prep.prepare(
        cfg, load_split, model=model, tokenizer=tokenizer, train_dataset=train_dataset, eval_dataset=eval_dataset
    )
    cfg = resolve_layout(cfg, run.model)
    policy, ranks, pad_id = run.model, run.ranks, run.tokenizer.pad_token_id
    unpaired = cfg.loss_type == ["kto"]
    losses = ["sigmoid"] if cfg.loss_type == ["plackett_luce"] else cfg.loss_type  # (what plackett_luce needs)
    needs_reference = unpaired or requirements(losses, cfg.reference_free, cfg.ipo_length_normalize)[0]
    reference, lora_reference = None, False
    if needs_reference:  # reference-free losses (simpo, orpo, sft, reference_free) load no reference at all
        # before any adapter exists, the policy itself is pi_ref unless another model is named
        reference = prep.reference_model(cfg, policy, ref_model).to(ranks.device)
        with prep.base_model(reference):  # a peft model the caller gave: pi_ref is its base, adapters off
            # held-out reference log-probs once, not at every eval (pairs only: refcache batches pairs)
            if not cfg.ref_sync_steps and not unpaired and not cfg.ranked:
                refcache.attach_reference_logps(
                    reference, run.eval_examples, cfg, pad_id, ranks.device, use_disk_cache=False
                )
            if cfg.precompute_ref_log_probs:
                refcache.attach_reference_logps(
                    reference, run.train_examples, cfg, pad_id, ranks.device, use_disk_cache=True
                )
        if cfg.precompute_ref_log_probs:
            reference = None  # nothing of the reference stays in memory while training
        elif cfg.use_lora and not cfg.ref_model and ref_model is None:
            reference, lora_reference = None, True  # no second copy: the base with adapters disabled
        elif reference is policy:
            reference = prep.frozen_copy(policy)
        else:
            reference.requires_grad_(False).eval()
    if cfg.use_lora and not models.is_peft(policy):
        policy = run.model = models.add_lora(policy, cfg)
    if cfg.gradient_checkpointing:
        prep.enable_gradient_checkpointing(policy, cfg.use_lora)
    if unpaired:
        step, collate = kto.KTOStep(reference, cfg), partial(kto.collate_kto, pad_id=pad_id)
        plot_keys = ("loss", "rewards/chosen", "rewards/rejected", "kl")
    elif cfg.ranked:
        layout = layout_name(cfg.padding_free, cfg.prefix_sharing)
        step, collate = (
            RankingStep(reference, cfg, lora_reference),
            partial(collate_rankings, layout=layout, pad_id=pad_id),
        )
        plot_keys = ("loss", "rewards/accuracies", "rewards/margins")
    else:
        layout = collate_for(layout_name(cfg.padding_free, cfg.prefix_sharing), pad_id)
        step, collate = DPOStep(reference, cfg, lora_reference), partial(collate_with_reference, collate=layout)
        plot_keys = ("loss", "rewards/accuracies", "rewards/margins")
    return prep.train(cfg, run, step, collate, callbacks=callbacks, plot_keys=plot_keys, what="trained model")
