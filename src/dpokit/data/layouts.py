"""Batch layouts beyond padding: padding-free packing and prompt (prefix) sharing. See docs/layouts.md.

Every layout turns B TokenizedPairs into one batch dict that `logprobs.sequence_logps` reads, and gives
the same 2B per-sequence log-probs as the padded layout of batch.py, in the same order: the chosen
responses of pairs 0..B-1, then the rejected ones.

    padded                (2B, T)  batch.py: prompt+chosen rows, then prompt+rejected rows, right-padded
    packed                (1, L)   the 2B sequences back to back, L = their total length: no padding at all
    prefix_shared         (B, T)   one row [prompt | chosen | rejected] per pair: the prompt is computed once
    prefix_shared_packed  (1, L)   the B prefix-shared blocks back to back

How the model keeps sequences apart:
- packed: `position_ids` restart at 0 at every sequence and no `attention_mask` is passed. transformers
  (masking_utils.find_packed_sequence_indices, used by create_causal_mask whenever attention_mask is None)
  then finds the sequence boundaries from the position ids and builds a block-diagonal causal mask for
  sdpa / eager / flex; flash-attention reads the same position ids as variable-length sequences.
- prefix-shared: transformers has no mask for "rejected sees the prompt but not chosen", so we build an
  explicit 4D mask (`prefix_shared_mask`), which create_causal_mask passes through untouched. Rejected's
  position ids continue from len(prompt), exactly as chosen's do, so both see the positions they would
  see in the padded layout.

Instead of a loss_mask, the new layouts name every response token explicitly: the flat position (into
input_ids.view(-1)) whose logits predict it, the token, and which of the 2B sequences it belongs to.
A shift by one cannot express prefix sharing: the first rejected token is predicted from the last prompt
token, which is followed by chosen, not by rejected.

Keys of a new-layout batch (N rows of T tokens; M response tokens):
    layout            the layout's name; sequence_logps dispatches on it ("padded" if absent)
    input_ids         (N, T)
    position_ids      (N, T) position within its own sequence
    sequence_ids      (N, T) which sequence (packed) or pair (prefix-shared) a token is in; -1: padding
    segment_ids       (N, T) prefix-shared only: PROMPT, CHOSEN, REJECTED, or -1 for padding
    logit_positions   (M,)  flat index of the position whose logits predict each response token
    target_ids        (M,)  the response tokens
    target_sequence   (M,)  0..B-1: chosen of pair i, B..2B-1: rejected of pair i
    num_examples      B
    num_tokens        int, the tokens the forward pass computes, padding excluded (for throughput)
There is deliberately no `attention_mask`: handed to a plain forward it would silently let sequences
attend to each other.
"""

from dataclasses import dataclass, field
from functools import partial

import torch

from dpokit.data.batch import collate_padded

LAYOUTS = ("padded", "packed", "prefix_shared", "prefix_shared_packed")
PROMPT, CHOSEN, REJECTED = 0, 1, 2


@dataclass
class Block:
    """Tokens laid out contiguously, attending only within the block; targets index into the block."""

    ids: list = field(default_factory=list)
    positions: list = field(default_factory=list)
    segments: list = field(default_factory=list)
    logit_positions: list = field(default_factory=list)  # local index of the predicting position
    targets: list = field(default_factory=list)
    target_sequence: list = field(default_factory=list)

    def add(self, tokens, segment, first_position, predicted_from, sequence):
        """Append `tokens` of one segment; its first token is predicted from local position `predicted_from`
        (None: no token of this segment is a target), every later one from the token before it."""
        start = len(self.ids)
        self.ids += tokens
        self.positions += range(first_position, first_position + len(tokens))
        self.segments += [segment] * len(tokens)
        if predicted_from is not None and tokens:
            self.logit_positions += [predicted_from] + list(range(start, start + len(tokens) - 1))
            self.targets += tokens
            self.target_sequence += [sequence] * len(tokens)


def sequence_blocks(pairs) -> list:
    """The padded layout's 2B sequences, each its own block: prompt+chosen of every pair, then prompt+rejected."""
    B, blocks = len(pairs), []
    for offset, response in ((0, "chosen_ids"), (B, "rejected_ids")):
        for i, p in enumerate(pairs):
            b = Block()
            b.add(p.prompt_ids, PROMPT, 0, None, None)
            b.add(
                getattr(p, response),
                CHOSEN if offset == 0 else REJECTED,
                len(p.prompt_ids),
                len(p.prompt_ids) - 1,
                offset + i,
            )
            blocks.append(b)
    return blocks


def prefix_shared_blocks(pairs) -> list:
    """One block [prompt | chosen | rejected] per pair. Both responses start at position len(prompt) and
    both first tokens are predicted from the last prompt token."""
    B, blocks = len(pairs), []
    for i, p in enumerate(pairs):
        P, b = len(p.prompt_ids), Block()
        b.add(p.prompt_ids, PROMPT, 0, None, None)
        b.add(p.chosen_ids, CHOSEN, P, P - 1, i)
        b.add(p.rejected_ids, REJECTED, P, P - 1, B + i)
        blocks.append(b)
    return blocks


def assemble(blocks: list, pad_id: int, packed: bool, layout: str, num_examples: int) -> dict:
    """Blocks -> batch: all in one row (packed), or one block per row, right-padded to the longest."""
    rows = [blocks] if packed else [[b] for b in blocks]
    T = max(sum(len(b.ids) for b in row) for row in rows)
    input_ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    position_ids = torch.zeros((len(rows), T), dtype=torch.long)
    sequence_ids = torch.full((len(rows), T), -1, dtype=torch.long)
    segment_ids = torch.full((len(rows), T), -1, dtype=torch.long)
    logit_positions, targets, target_sequence = [], [], []
    block_no = 0
    for r, row in enumerate(rows):
        start = 0
        for b in row:
            span = slice(start, start + len(b.ids))
            input_ids[r, span] = torch.tensor(b.ids)
            position_ids[r, span] = torch.tensor(b.positions)
            sequence_ids[r, span] = block_no
            segment_ids[r, span] = torch.tensor(b.segments)
            logit_positions += [r * T + start + j for j in b.logit_positions]
            targets += b.targets
            target_sequence += b.target_sequence
            start += len(b.ids)
            block_no += 1
    return {
        "layout": layout,
        "input_ids": input_ids,
        "position_ids": position_ids,
        "sequence_ids": sequence_ids,
        "segment_ids": segment_ids,
        "logit_positions": torch.tensor(logit_positions),
        "target_ids": torch.tensor(targets),
        "target_sequence": torch.tensor(target_sequence),
        "num_examples": num_examples,
        "num_tokens": sum(len(b.ids) for b in blocks),
    }


def collate_packed(pairs: list, pad_id: int = 0) -> dict:
    """B TokenizedPairs -> the 2B sequences packed into one (1, L) row, positions restarting at each one."""
    return assemble(sequence_blocks(pairs), pad_id, packed=True, layout="packed", num_examples=len(pairs))


def collate_prefix_shared(pairs: list, pad_id: int, packed: bool = False) -> dict:
    """B TokenizedPairs -> one [prompt | chosen | rejected] block per pair: (B, T) rows, or one (1, L) row."""
    return assemble(
        prefix_shared_blocks(pairs),
        pad_id,
        packed=packed,
        layout="prefix_shared_packed" if packed else "prefix_shared",
        num_examples=len(pairs),
    )


def layout_name(padding_free: bool = False, prefix_sharing: bool = False) -> str:
    """The config switches -> a layout name."""
    if prefix_sharing:
        return "prefix_shared_packed" if padding_free else "prefix_shared"
    return "packed" if padding_free else "padded"


def collate_for(layout: str, pad_id: int):
    """A collate function pairs -> batch for `layout` (one of LAYOUTS); picklable, for DataLoader workers."""
    if layout == "padded":
        return partial(collate_padded, pad_id=pad_id)
    if layout == "packed":
        return partial(collate_packed, pad_id=pad_id)
    if layout in ("prefix_shared", "prefix_shared_packed"):
        return partial(collate_prefix_shared, pad_id=pad_id, packed=layout == "prefix_shared_packed")
    raise ValueError(f"unknown batch layout {layout!r}; expected one of {', '.join(LAYOUTS)}")


def prefix_shared_mask(sequence_ids: torch.Tensor, segment_ids: torch.Tensor) -> torch.Tensor:
    """(N, T) block and segment ids -> (N, 1, T, T) bool, True where query token q may attend to key token k.

    Causal within a block, and a response sees the prompt and itself only: rejected tokens never see chosen
    ones (they follow chosen in the row, so causality alone would let them). The rule is the same for any
    number of responses in their own segments 1..K (ranked lists, data/rankings.py; `dpokit rl`'s k
    samples of a prompt, train/rl_step.response_batch). A padding token sees
    only itself: a softmax row with nothing to attend to would be NaN, and NaN times a zero gradient is
    still NaN.
    """
    T = sequence_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=sequence_ids.device).tril()  # (T, T)
    same_block = sequence_ids[:, :, None] == sequence_ids[:, None, :]  # (N, T, T)
    prompt_or_own = (segment_ids[:, None, :] == PROMPT) | (segment_ids[:, :, None] == segment_ids[:, None, :])
    real = (sequence_ids >= 0)[:, :, None]  # (N, T, 1)
    allowed = same_block & causal & prompt_or_own & real
    allowed |= torch.eye(T, dtype=torch.bool, device=sequence_ids.device)
    return allowed[:, None]
