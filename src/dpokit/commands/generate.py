"""`dpokit generate`: sample responses to a set of prompts, the first half of building preference data
the way the DPO paper did (sample several responses per prompt from pi_SFT, then label them: `dpokit
pairs`), and the sampler `dpokit rl` draws its rollouts with.

Prompts (data/prompts.py): `prompt` strings or messages, `messages` conversations, or the prompts of a
preference file. Each is tokenized exactly as training tokenizes it (the chat template with its
generation prompt for messages), cut to max_prompt_length, and sampled num_samples_per_prompt times.
Output: one JSON line per prompt,

    {"prompt": <as in the input>, "responses": ["...", ...], "finished": [true, ...]}

`finished` says whether the response ended with EOS within max_new_tokens (rather than being cut).

Sampling is ancestral sampling from the model's own distribution by default: temperature 1, top_p 1
and top_k 0 (off; transformers' generate would otherwise apply its global default top_k=50). Batched,
left-padded; each response is cut after its first EOS. Under bf16 autocast the output layer still runs
in fp32 (logprobs.fp32_output_layer), as it does where dpokit scores log-probs, so the samples come from
the distribution that is scored, up to the bf16 rounding of the rest of the model.
"""

import typing
from dataclasses import dataclass
from pathlib import Path

import torch

from dpokit.config import PRECISIONS, opt, resolve_config
from dpokit.errors import UserError
from dpokit.io import write_jsonl_atomic
from dpokit.sampling import device_of, sample_responses


@dataclass
class GenerateConfig:
    """Sample responses to prompts, written as JSON lines {prompt, responses, finished}."""

    model: str = opt(
        "default", "the model to sample from: a HF model directory, a hub name, a .gguf file, or 'default'"
    )
    dataset: str = opt(
        None,
        "prompts: rows with `prompt` (a string or messages), `messages` conversations, or "
        "preference rows (their prompts)",
    )
    dataset_split: str = opt("train", "split of `dataset` (for `datasets` names and directories)")
    max_prompts: typing.Optional[int] = opt(None, "use only the first N distinct prompts")
    output_file: str = opt("samples.jsonl", "the JSONL file to write")
    num_samples_per_prompt: int = opt(4, "responses sampled for each prompt")
    max_new_tokens: int = opt(64, "maximum tokens per response")
    temperature: float = opt(1.0, "sampling temperature (0: greedy)")
    top_p: float = opt(1.0, "nucleus sampling threshold (1: off)")
    top_k: int = opt(0, "sample among the k most likely tokens only (0: off)")
    batch_size: int = opt(32, "sequences per generate call")
    max_prompt_length: typing.Optional[int] = opt(512, "longer prompts are cut per truncation_mode")
    truncation_mode: str = opt("keep_end", "which part of a too-long prompt to keep", ["keep_end", "keep_start"])
    precision: str = opt(
        "auto", "auto (bf16 where the device does it natively, else fp32), fp32, or bf16 autocast", PRECISIONS
    )
    seed: int = opt(0, "seed for sampling: the same seed gives the same samples")
    trust_remote_code: bool = opt(False, "allow model repositories to run their own code")

    def check(self):
        for key in ("num_samples_per_prompt", "batch_size", "max_new_tokens"):
            if getattr(self, key) < 1:
                raise UserError(f"key '{key}': must be at least 1, got {getattr(self, key)}")
        if self.top_k < 0:
            raise UserError(f"key 'top_k': must be non-negative, got {self.top_k}")


def generate(config=None, *, model=None, tokenizer=None) -> list:
    """Sample responses (config: a GenerateConfig, a dict of its keys or a YAML path; model / tokenizer:
    loaded objects in place of the `model` key). Writes output_file; returns its rows."""
    from dpokit import models
    from dpokit.data.prompts import load_prompts, tokenize_prompt, truncate_prompt
    from dpokit.report import log
    from dpokit.train.runtime import autocast, set_seed

    cfg = resolve_config(GenerateConfig, config, model=getattr(model, "name_or_path", None) if model else None)
    out = Path(cfg.output_file)
    if out.is_dir():
        raise UserError(f"{out}: output_file is a directory")
    tokenizer = tokenizer or models.load_tokenizer(cfg.model, cfg.trust_remote_code)
    prompts, label = load_prompts(cfg.dataset, cfg.dataset_split)
    prompts = prompts[: cfg.max_prompts] if cfg.max_prompts else prompts
    ids = [
        truncate_prompt(tokenize_prompt(tokenizer, p, label, row), cfg.max_prompt_length, cfg.truncation_mode)
        for row, p in prompts
    ]
    if model is None:
        model = models.load_model(cfg.model, cfg.trust_remote_code)
        if torch.cuda.is_available():
            model.to("cuda")
    k = cfg.num_samples_per_prompt
    log.info("%s: sampling %d responses for each of %d prompts", label, k, len(prompts))
    set_seed(cfg.seed)
    with autocast(device_of(model), cfg.precision):
        responses = sample_responses(
            model,
            tokenizer,
            [p for p in ids for _ in range(k)],
            cfg.max_new_tokens,
            cfg.temperature,
            cfg.top_p,
            cfg.top_k,
            cfg.batch_size,
        )
    eos, rows = tokenizer.eos_token_id, []
    for i, (_, prompt) in enumerate(prompts):
        mine = responses[i * k : (i + 1) * k]
        rows.append(
            {
                "prompt": prompt,
                "responses": [tokenizer.decode(r, skip_special_tokens=True) for r in mine],
                "finished": [bool(r) and r[-1] == eos for r in mine],
            }
        )
    write_jsonl_atomic(out, rows)
    log.info("wrote %d prompts x %d responses to %s", len(rows), k, out)
    return rows
