"""Ranked lists: a prompt and K responses with a ranking or scores, read, checked, tokenized and batched.

Rows (K >= 2, and K may differ from row to row):

    {"prompt": ..., "completions": [y_1, ..., y_K], "ranks":  [1, 3, 2, ...]}    1 = the best
    {"prompt": ..., "completions": [y_1, ..., y_K], "scores": [7.5, 2.0, ...]}   higher = better

standard (strings) or conversational (the prompt a list of messages, each completion a list of messages,
usually one assistant message), as for pairs; the kind is the first row's prompt's, and every field of
every row must follow it. A row has `ranks` or `scores`, not both. Equal ranks or equal scores are ties:
tied responses share a rank, which the losses treat as no preference between them (ranking_losses.py:
Breslow's rule for Plackett-Luce, no pair between them for pairs_from_ranking). The prompt is required
(no implicit prompt: K responses have no one "common beginning" to split at).

Tokenization is that of pairs, response by response (tokenize.tokenize_pair and truncate, so every
response is boundary-exact against the prompt's own tokens and ends with one EOS). After truncation,
responses with identical token ids are one response, with the best of their ranks; a list left with
fewer than two responses, or whose responses all tie, says nothing about preference and is dropped
(counted, as dropped pairs are).

Batches (`collate_rankings`) hold the lists' N = sum K sequences in any layout of data/layouts.py,
list by list (list 0's responses in its row order, then list 1's, ...), so logprobs.sequence_logps
returns (N,) log-probs; `ranking_index` (B, K) gathers them into lists and `ranks` (B, K) says each
one's rank (0 = best, -1: no response, a shorter list). Prefix sharing generalises from 2 to K:
[prompt | y_1 | ... | y_K] in one block, each response attending to the prompt and itself only
(layouts.prefix_shared_mask) and starting at position len(prompt).
"""

import math
from dataclasses import dataclass, field

import torch

from dpokit.data.batch import pad_right
from dpokit.data.layouts import LAYOUTS, PROMPT, Block, assemble
from dpokit.data.load import check_field, read_rows
from dpokit.data.tokenize import TokenizedPair, tokenize_pair, truncate
from dpokit.errors import UserError, where
from dpokit.ranking_losses import pairs_from_ranking

RANKING_FIELDS = ("prompt", "completions")
RANKING_SOURCES = ("ranks", "scores")
# The most responses in one list: the losses build (K, K) choice sets per list and the layouts put a list's
# K responses in one row (prefix sharing), so K is bounded like a field's length is (load.MAX_FIELD_CHARS).
MAX_COMPLETIONS = 256


@dataclass
class TokenizedRanking:
    """A prompt and its K responses as token ids, and each response's rank (0 = best; ties share one)."""

    prompt_ids: list
    responses: list  # K lists of token ids
    ranks: list  # K ints, dense: 0 .. (number of distinct ranks - 1)
    row: int = 0


@dataclass
class RankingStats:
    kept: int = 0
    responses: int = 0
    merged: int = 0  # responses identical (after truncation) to another of their list
    dropped: dict = field(default_factory=dict)  # reason -> count

    def drop(self, reason):
        self.dropped[reason] = self.dropped.get(reason, 0) + 1

    def summary(self) -> str:
        text = f"{self.kept} ranked lists ({self.responses} responses)"
        if self.merged:
            text += f", {self.merged} duplicate responses merged"
        if self.dropped:
            why = ", ".join(f"{n} {r}" for r, n in sorted(self.dropped.items()))
            text += f", {sum(self.dropped.values())} lists dropped ({why})"
        return text


def dense_ranks(values, higher_is_better: bool) -> list:
    """Values -> 0-based dense ranks, 0 for the best; equal values share a rank."""
    order = sorted(set(values), reverse=higher_is_better)
    position = {v: i for i, v in enumerate(order)}
    return [position[v] for v in values]


def _missing(label, row, key, obj):
    names = ", ".join(repr(k) for k in obj if isinstance(k, str))[:200]
    need = "ranked lists need prompt, completions and ranks or scores"
    return UserError(f"{where(label, row, key)}: missing ({need}; columns: {names or 'none'})")


def _check_numbers(label, row, key, values, k: int, integers: bool) -> list:
    if not isinstance(values, list):
        raise UserError(f"{where(label, row, key)}: expected a list of {k} numbers, got {type(values).__name__}")
    if len(values) != k:
        raise UserError(f"{where(label, row, key)}: {len(values)} values for {k} completions")
    for v in values:
        number = isinstance(v, int) if integers else isinstance(v, (int, float))
        if isinstance(v, bool) or not number:
            what = "integers (1 = the best)" if integers else "numbers (higher = better)"
            raise UserError(f"{where(label, row, key)}: expected {what}, got {v!r:.40}")
        if not integers and not math.isfinite(v):
            raise UserError(f"{where(label, row, key)}: must be finite, got {v!r}")
    return values


def check_ranking_row(label, row, obj, kind) -> dict:
    """One row -> {prompt, completions, ranks (dense, 0 = best)}, or a UserError naming row and field."""
    for key in RANKING_FIELDS:
        if key not in obj:
            raise _missing(label, row, key, obj)
    sources = [k for k in RANKING_SOURCES if obj.get(k) is not None]
    if not sources:
        raise _missing(label, row, "ranks", obj)
    if len(sources) == 2:
        raise UserError(f"{where(label, row, 'scores')}: give ranks or scores, not both")
    check_field(label, row, "prompt", obj["prompt"], kind)
    completions = obj["completions"]
    if not isinstance(completions, list) or len(completions) < 2:
        got = f"{len(completions)}" if isinstance(completions, list) else f"a {type(completions).__name__}"
        raise UserError(f"{where(label, row, 'completions')}: expected a list of at least 2 responses, got {got}")
    if len(completions) > MAX_COMPLETIONS:
        raise UserError(
            f"{where(label, row, 'completions')}: {len(completions)} responses, over the limit of {MAX_COMPLETIONS} "
            f"(dpokit.data.rankings.MAX_COMPLETIONS)"
        )
    for k, completion in enumerate(completions):
        check_field(label, row, f"completions[{k}]", completion, kind)
    key = sources[0]
    values = _check_numbers(label, row, key, obj[key], len(completions), integers=key == "ranks")
    return {"prompt": obj["prompt"], "completions": completions, "ranks": dense_ranks(values, key == "scores")}


def load_rankings(source, split: str = "train") -> tuple[list, str, str]:
    """Checked ranked rows: ([(row_number, {prompt, completions, ranks})], label, format)."""
    rows, label = read_rows(source, split)
    if not rows:
        raise UserError(f"{label}: no rows")
    first = next((obj["prompt"] for _, obj in rows if isinstance(obj.get("prompt"), (str, list))), "")
    kind = "messages" if isinstance(first, list) else "str"
    out = [(row, check_ranking_row(label, row, obj, kind)) for row, obj in rows]
    return out, label, "conversational" if kind == "messages" else "standard"


def tokenize_ranking(tok, example: dict, label, row, max_length, max_prompt_length, truncation_mode):
    """One checked row -> (prompt_ids, [ids of each response]), or (None, why) when the list is dropped."""
    prompt_ids, responses = None, []
    for k, completion in enumerate(example["completions"]):
        name = f"completions[{k}]"
        pair = tokenize_pair(
            tok, {"prompt": example["prompt"], "chosen": completion, "rejected": completion}, label, row,
            ("prompt", name, name),
        )  # fmt: skip
        if not pair.prompt_ids:
            return None, "with an empty prompt"
        cut = truncate(pair, max_length, max_prompt_length, truncation_mode)
        if cut is None:
            return None, "whose responses would be empty after truncation"
        prompt_ids = cut.prompt_ids  # the prompt is tokenized on its own: the same for every response
        responses.append(cut.chosen_ids)
    return prompt_ids, responses


def tokenize_rankings(tok, rows, label, max_length=None, max_prompt_length=None, truncation_mode="keep_end"):
    """Checked rows -> (TokenizedRankings, RankingStats)."""
    stats, out = RankingStats(), []
    for row, example in rows:
        prompt_ids, responses = tokenize_ranking(
            tok, example, label, row, max_length, max_prompt_length, truncation_mode
        )
        if prompt_ids is None:
            stats.drop(responses)
            continue
        best = {}  # token ids -> (first index, best rank): identical responses are one response
        for k, ids in enumerate(responses):
            key = tuple(ids)
            first, rank = best.get(key, (k, example["ranks"][k]))
            best[key] = (first, min(rank, example["ranks"][k]))
        stats.merged += len(responses) - len(best)
        kept = sorted(best.items(), key=lambda item: item[1][0])  # in the row's order
        ranks = [rank for _, (_, rank) in kept]
        if len(kept) < 2 or len(set(ranks)) < 2:
            stats.drop("with fewer than 2 distinct responses" if len(kept) < 2 else "whose responses all tie")
            continue
        out.append(TokenizedRanking(prompt_ids, [list(ids) for ids, _ in kept], dense_ranks(ranks, False), row))
        stats.responses += len(kept)
    stats.kept = len(out)
    if not out:
        raise UserError(f"{label}: no usable ranked lists ({stats.summary()})")
    return out, stats


def split_into_pairs(rankings: list, mode: str) -> list:
    """TokenizedRankings -> the TokenizedPairs `mode` keeps (ranking_losses.pairs_from_ranking's modes), for
    code that reads pairs (e.g. a comparison with DPO on the same data)."""
    pairs = []
    for r in rankings:
        lists, winners, losers = pairs_from_ranking(torch.tensor([r.ranks]), mode)
        pairs += [TokenizedPair(r.prompt_ids, r.responses[w], r.responses[l], r.row) for w, l in zip(winners, losers)]
    return pairs


# --- batches -----------------------------------------------------------------------------------------------


def ranking_blocks(rankings: list, shared: bool) -> list:
    """Blocks of layouts.assemble: one per response (prompt + response), or with `shared` one per list,
    [prompt | y_1 | ... | y_K], each response in its own segment (1..K) from position len(prompt)."""
    blocks, sequence = [], 0
    for r in rankings:
        P = len(r.prompt_ids)
        if shared:
            b = Block()
            b.add(r.prompt_ids, PROMPT, 0, None, None)
        for k, ids in enumerate(r.responses):
            if not shared:
                b = Block()
                b.add(r.prompt_ids, PROMPT, 0, None, None)
            b.add(ids, 1 + k, P, P - 1, sequence)
            sequence += 1
            if not shared:
                blocks.append(b)
        if shared:
            blocks.append(b)
    return blocks


def collate_padded_rankings(rankings: list, pad_id: int) -> dict:
    """The padded layout: one row prompt + response per response, (N, T), with attention and loss masks."""
    seqs = [r.prompt_ids + ids for r in rankings for ids in r.responses]
    masks = [[0] * len(r.prompt_ids) + [1] * len(ids) for r in rankings for ids in r.responses]
    attention_mask = pad_right([[1] * len(s) for s in seqs], 0)
    return {
        "input_ids": pad_right(seqs, pad_id),
        "attention_mask": attention_mask,
        "loss_mask": pad_right(masks, 0),
        "num_tokens": int(attention_mask.sum()),
    }


def collate_rankings(rankings: list, layout: str = "padded", pad_id: int = 0) -> dict:
    """B TokenizedRankings -> one batch in `layout` (one of layouts.LAYOUTS) holding their N responses, plus
    num_examples B, num_sequences N, ranking_index (B, K) (each list's sequences, -1 past its end) and
    ranks (B, K) (0 = best, -1 past the end)."""
    if layout == "padded":
        batch = collate_padded_rankings(rankings, pad_id)
    elif layout in LAYOUTS:
        shared = layout.startswith("prefix_shared")
        batch = assemble(
            ranking_blocks(rankings, shared), pad_id, packed=layout.endswith("packed"), layout=layout, num_examples=0
        )
    else:
        raise ValueError(f"unknown batch layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
    B, K = len(rankings), max(len(r.responses) for r in rankings)
    index = torch.full((B, K), -1, dtype=torch.long)
    ranks = torch.full((B, K), -1, dtype=torch.long)
    start = 0
    for i, r in enumerate(rankings):
        k = len(r.responses)
        index[i, :k] = torch.arange(start, start + k)
        ranks[i, :k] = torch.tensor(r.ranks)
        start += k
    batch.update(num_examples=B, num_sequences=start, ranking_index=index, ranks=ranks)
    return batch
