"""`dpokit pairs`: sampled responses -> preference pairs, labelled by a reward: the second half of
building preference data the DPO paper's way (several samples per prompt from pi_SFT, compared under
a reward; Rafailov et al., 2023, Sec. 6.1) when the reward is a model or a function rather than people.

Input: the JSONL of `dpokit generate`, rows {prompt, responses: [...], finished: [...]}, or rows
{prompt, response} (rows sharing a prompt are grouped). Each prompt's distinct responses are scored by
the reward (`rm:PATH` a reward model of `dpokit rm`, `vader`, or `module:function`), then paired:

  all_pairs      every two responses whose rewards differ by more than min_margin, the higher chosen
  best_vs_worst  the highest against the lowest reward, if they differ by more than min_margin
  ranking        no pairs: one ranked list per prompt, all its K responses with their rewards as scores

Ties (equal rewards, or within min_margin) are dropped; so are identical responses, and, when the input
says so, responses cut off at max_new_tokens (drop_unfinished). Output: rows {prompt, chosen, rejected,
score_chosen, score_rejected}, or with `ranking` rows {prompt, completions, scores} (equal scores stay:
they are ties, which the ranking losses handle; a prompt whose responses all tie, or with fewer than two
left, is dropped), in the prompt's format (an assistant message for conversational prompts), which
`dpokit dpo` (and `dpokit rm`) read as they are (rankings: with loss_type=plackett_luce or
pairs_from_ranking): a .jsonl file, or a directory with train.jsonl and, with test_fraction > 0,
test.jsonl (split by prompt).
"""

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

from dpokit.config import opt, resolve_config
from dpokit.errors import UserError, where


@dataclass
class PairsConfig:
    """Label sampled responses with a reward into preference pairs that `dpokit dpo` trains on."""

    samples: str = opt(
        None,
        "sampled responses: the JSONL of `dpokit generate` (prompt, responses[, finished]) or rows of prompt, response",
    )
    reward: str = opt(None, "the reward: rm:PATH (a `dpokit rm` model), vader, or module:function")
    pairing: str = opt(
        "all_pairs",
        "which pairs of a prompt's responses to keep; ranking: write one ranked list per prompt instead "
        "(prompt, completions, scores), for loss_type=plackett_luce or pairs_from_ranking",
        ["all_pairs", "best_vs_worst", "ranking"],
    )
    min_margin: float = opt(
        0.0, "drop pairs whose rewards differ by this much or less (0: only exact ties; not with ranking)"
    )
    drop_unfinished: bool = opt(True, "drop responses that did not end with EOS (the input's `finished`)")
    output: str = opt("pairs.jsonl", "a .jsonl file, or a directory that receives train.jsonl (and test.jsonl)")
    test_fraction: float = opt(0.0, "fraction of prompts held out in test.jsonl (output must be a directory)")
    seed: int = opt(0, "seed of the train/test split of prompts")

    def check(self):
        if self.samples is None or self.reward is None:
            raise UserError(f"key '{'samples' if self.samples is None else 'reward'}' is required")
        if not 0 <= self.test_fraction < 1:
            raise UserError(f"key 'test_fraction': must be in [0, 1), got {self.test_fraction}")
        if self.min_margin < 0:
            raise UserError(f"key 'min_margin': must be non-negative, got {self.min_margin}")
        if self.pairing == "ranking" and self.min_margin > 0:
            raise UserError("key 'min_margin': pairs only; a ranking keeps every response with its reward as score")
        if self.output.endswith(".jsonl") and self.test_fraction > 0:
            raise UserError(
                "key 'test_fraction': needs `output` to be a directory (it receives train.jsonl and test.jsonl)"
            )


def read_samples(path: str) -> tuple[list, int]:
    """-> ([(prompt, [(response, finished)])] in first-seen order, responses read)."""
    from dpokit.data.load import check_field, read_rows

    rows, label = read_rows(path)
    if not rows:
        raise UserError(f"{label}: no rows")
    groups, n = {}, 0
    for row, obj in rows:
        prompt = obj.get("prompt")
        check_field(label, row, "prompt", prompt, "messages" if isinstance(prompt, list) else "str")
        if "responses" in obj:
            responses = obj["responses"]
            if not isinstance(responses, list):
                raise UserError(f"{where(label, row, 'responses')}: expected a list of strings")
        elif "response" in obj:
            responses = [obj["response"]]
        else:
            raise UserError(f"{where(label, row)}: no 'responses' (or 'response') field")
        finished = obj.get("finished", [True] * len(responses))
        finished = finished if isinstance(finished, list) else [finished]
        if len(finished) != len(responses):
            raise UserError(f"{where(label, row, 'finished')}: {len(finished)} values for {len(responses)} responses")
        for r in responses:
            if not isinstance(r, str):
                raise UserError(f"{where(label, row, 'responses')}: expected strings, got {type(r).__name__}")
        key = json.dumps(prompt, sort_keys=True)
        groups.setdefault(key, (prompt, []))[1].extend(zip(responses, map(bool, finished)))
        n += len(responses)
    return list(groups.values()), n


def make_pairs(responses: list, rewards: list, pairing: str, min_margin: float) -> tuple[list, int]:
    """One prompt's distinct responses and their rewards -> ([(chosen, rejected, r_chosen, r_rejected)],
    pairs dropped as ties)."""
    if len(responses) < 2:
        return [], 0
    if pairing == "best_vs_worst":
        hi = max(range(len(rewards)), key=lambda i: rewards[i])
        lo = min(range(len(rewards)), key=lambda i: rewards[i])
        candidates = [(hi, lo)]
    else:
        candidates = [
            (i, j) if rewards[i] >= rewards[j] else (j, i)
            for i in range(len(responses))
            for j in range(i + 1, len(responses))
        ]
    out, ties = [], 0
    for w, l in candidates:
        if rewards[w] - rewards[l] > min_margin:
            out.append((responses[w], responses[l], rewards[w], rewards[l]))
        else:
            ties += 1
    return out, ties


def pairs(config=None) -> dict:
    """Label sampled responses into preference pairs (config: a PairsConfig, a dict of its keys or a
    YAML path); writes `output` and returns the counts."""
    from dpokit.data.prompts import response_message
    from dpokit.io import write_jsonl_atomic
    from dpokit.report import log
    from dpokit.rewards import get_reward_fn

    cfg = resolve_config(PairsConfig, config)
    out = Path(cfg.output)
    single_file = out.suffix == ".jsonl"
    groups, n_read = read_samples(cfg.samples)
    reward_fn = get_reward_fn(cfg.reward)

    # distinct responses of each prompt (optionally finished ones only), scored in one call
    kept, dropped_unfinished, duplicates = [], 0, 0
    for prompt, responses in groups:
        seen = []
        for text, finished in responses:
            if cfg.drop_unfinished and not finished:
                dropped_unfinished += 1
            elif text in seen:
                duplicates += 1
            else:
                seen.append(text)
        kept.append((prompt, seen))
    flat = [(p, r) for p, rs in kept for r in rs]
    scores = [float(s) for s in reward_fn([p for p, _ in flat], [r for _, r in flat])] if flat else []
    if any(not math.isfinite(s) for s in scores):
        raise UserError(f"reward '{cfg.reward}' returned a non-finite value")

    rows, ties, i = [], 0, 0
    for prompt, responses in kept:
        rewards, i = scores[i : i + len(responses)], i + len(responses)
        if cfg.pairing == "ranking":
            if len(responses) < 2 or len(set(rewards)) < 2:
                ties += 1  # nothing to rank: one response, or all tie
                continue
            completions = [response_message(prompt, r) for r in responses]
            rows.append([{"prompt": prompt, "completions": completions, "scores": rewards}])
            continue
        pairs, t = make_pairs(responses, rewards, cfg.pairing, cfg.min_margin)
        ties += t
        rows.append(
            [
                {
                    "prompt": prompt,
                    "chosen": response_message(prompt, c),
                    "rejected": response_message(prompt, r),
                    "score_chosen": rc,
                    "score_rejected": rr,
                }
                for c, r, rc, rr in pairs
            ]
        )
    n_pairs = sum(len(r) for r in rows)
    what = "ranked lists" if cfg.pairing == "ranking" else "preference pairs"
    if n_pairs == 0:
        raise UserError(f"{cfg.samples}: no {what} (every prompt's responses tie or fewer than 2 are left)")
    stats = {"prompts": len(groups), "responses": n_read}
    if cfg.pairing == "ranking":
        stats.update(rankings=n_pairs, lists_dropped=ties)
    else:
        stats.update(pairs=n_pairs, ties_dropped=ties)
    stats.update(
        unfinished_dropped=dropped_unfinished, duplicates_dropped=duplicates, mean_reward=sum(scores) / len(scores)
    )
    if cfg.pairing != "ranking":
        stats["mean_margin"] = sum(r["score_chosen"] - r["score_rejected"] for g in rows for r in g) / n_pairs
    if single_file:
        write_jsonl_atomic(out, [r for g in rows for r in g])
        written = [out]
    else:
        order = list(range(len(rows)))
        random.Random(cfg.seed).shuffle(order)
        n_test = round(cfg.test_fraction * len(rows))
        test = set(order[:n_test])
        write_jsonl_atomic(out / "train.jsonl", [r for j, g in enumerate(rows) if j not in test for r in g])
        written = [out / "train.jsonl"]
        if n_test:
            write_jsonl_atomic(out / "test.jsonl", [r for j, g in enumerate(rows) if j in test for r in g])
            written.append(out / "test.jsonl")
    log.info("%s", ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in stats.items()))
    log.info("wrote %s", ", ".join(map(str, written)))
    return stats
