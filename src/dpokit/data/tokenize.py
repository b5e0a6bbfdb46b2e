"""Preference rows -> token ids, exact at the prompt/response boundary.

The response's tokens are the tokens the model has to generate after the (templated) prompt: the
prompt is tokenized on its own, exactly as it is fed at generation time, and the response is what
follows it. We tokenize prompt and prompt + response and keep the tail when the prompt's tokens are a
prefix of the whole; when a merge crosses the boundary (a prompt ending in a space or newline that
BPE would join to the response's first word), `tok(a) + tok(b) != tok(a + b)` and we tokenize the
response on its own instead, as the continuation of the prompt's own tokens.

Every response ends with exactly one EOS (unless truncation cut it off: a cut response must not teach
the model to stop there); a sequence holds at most one BOS.

Work per row is linear in its length (load.py bounds the length): no loop here re-slices a list per
step, and common prefixes are found by comparing slices, not characters one by one in Python.
"""

from dataclasses import dataclass, field

from dpokit.errors import UserError, where

# tokenize_pair's (prompt, chosen, rejected) as errors name them for a prompt/completion row (KTO, SFT)
PAIR_FIELDS = ("prompt", "chosen", "rejected")
COMPLETION_FIELDS = ("prompt", "completion", "completion")  # (names in errors for prompt, chosen, rejected)


@dataclass
class TokenizedPair:
    """A prompt and two responses as token ids (boundary-exact). SFT demonstrations and KTO rows use it too,
    with their one completion in both halves (tokenize_dataset(completions=True)), so that every stage
    shares the pair layouts of data/layouts.py."""

    prompt_ids: list
    chosen_ids: list
    rejected_ids: list
    row: int = 0


@dataclass
class TokenizeStats:
    kept: int = 0
    dropped: dict = field(default_factory=dict)  # reason -> count

    def drop(self, reason):
        self.dropped[reason] = self.dropped.get(reason, 0) + 1

    def summary(self) -> str:
        if not self.dropped:
            return f"{self.kept} pairs"
        why = ", ".join(f"{n} {r}" for r, n in sorted(self.dropped.items()))
        return f"{self.kept} pairs kept, {sum(self.dropped.values())} dropped ({why})"


def _encode(tok, text, special):
    return list(tok(text, add_special_tokens=special)["input_ids"])


def _one_bos(tok, ids):
    """A leading run of BOS tokens cut to one (a template's BOS + the tokenizer's own)."""
    bos, n = tok.bos_token_id, 0
    while bos is not None and n < len(ids) and ids[n] == bos:
        n += 1
    return ids[n - 1 :] if n >= 2 else ids


def split_at_boundary(tok, prompt: str, response: str, special: bool) -> tuple[list, list]:
    """(prompt_ids, response_ids) with prompt_ids == tokenizer(prompt) and the response as its continuation."""
    prompt_ids = _one_bos(tok, _encode(tok, prompt, special))
    full_ids = _one_bos(tok, _encode(tok, prompt + response, special))
    return prompt_ids, response_after_prompt(tok, prompt_ids, full_ids, response, special)


def response_after_prompt(tok, prompt_ids: list, full_ids: list, response: str, special: bool, ids=None) -> list:
    """The response's ids, given prompt and prompt + response already encoded (each with _one_bos): the
    tail of full_ids after prompt_ids, or, where a merge crossed the boundary, the response encoded as a
    continuation (the model, given prompt_ids, generates it from scratch). `ids`: an object with the
    tokenizer's eos_token_id and eos_token read once (data/batched.py's special_ids), else the tokenizer."""
    ids = ids or tok
    if (
        special
        and ids.eos_token_id is not None
        and full_ids
        and full_ids[-1] == ids.eos_token_id
        and not response.endswith(ids.eos_token or "\0")
    ):
        full_ids = full_ids[:-1]  # tokenizers that append EOS themselves: we add our own below
    if full_ids[: len(prompt_ids)] == prompt_ids:
        return full_ids[len(prompt_ids) :]
    return continuation_ids(tok, response)


def continuation_ids(tok, text: str) -> list:
    """Token ids of `text` continuing earlier tokens, without the word-start marker that sentencepiece-
    style tokenizers put before standalone text ('yes' -> '▁yes'). Tokenized right after the EOS token:
    special tokens are split off before pre-tokenization, so nothing merges with them or adds a prefix."""
    ids = _encode(tok, tok.eos_token + text, False)
    if ids and ids[0] == tok.eos_token_id:
        return ids[1:]
    return _encode(tok, text, False)


def end_with_one_eos(tok, ids: list) -> list:
    """Cut whatever a chat template puts after the last EOS (e.g. a newline) or append EOS if none."""
    eos = tok.eos_token_id
    if eos in ids:
        first = len(ids) - 1 - ids[::-1].index(eos)  # the last EOS
        while first > 0 and ids[first - 1] == eos:  # a run of EOS at the end counts once
            first -= 1
        return ids[: first + 1]
    return ids + [eos]


def common_prefix_messages(a: list, b: list) -> int:
    n = 0
    while n < min(len(a), len(b)) - 1 and a[n] == b[n]:
        n += 1
    return n


def common_prefix_text(a: str, b: str) -> int:
    # Bisect on slice equality (compared in C; halving: O(n) in all) rather than a loop per character.
    n, hi = 0, min(len(a), len(b))
    while n < hi:  # a[:n] == b[:n], and they differ somewhere before hi + 1
        mid = (n + hi + 1) // 2
        if a[n:mid] == b[n:mid]:
            n = mid
        else:
            hi = mid - 1
    if n < min(len(a), len(b)):  # don't split a word: back off to just after the last whitespace
        while n > 0 and not a[n - 1].isspace():
            n -= 1
    return n


def explicit_prompt(example: dict, label="", row=0) -> dict:
    """Implicit-prompt rows: the prompt is the longest common prefix of chosen and rejected. An empty
    one (no common first message, or no common text but whitespace) is an error: such a row has lost
    its prompt, and a conversation cannot be rendered without one."""
    if "prompt" in example:
        return example
    c, r = example["chosen"], example["rejected"]
    n = common_prefix_messages(c, r) if isinstance(c, list) else common_prefix_text(c, r)
    if n == 0 or (isinstance(c, str) and not c[:n].strip()):
        raise UserError(
            f"{where(label, row, 'chosen')}: no prompt: chosen and rejected do not begin with a "
            f"common prompt (a row without a 'prompt' takes it from their common beginning)"
        )
    return {"prompt": c[:n], "chosen": c[n:], "rejected": r[n:]}


def apply_template(tok, messages: list, label, row, key, **kwargs) -> str:
    """The chat template's text for `messages`; a template that refuses them (a Jinja raise_exception on
    roles it does not take, a content it cannot format) is an error naming the row and field."""
    if tok.chat_template is None:
        raise UserError(f"{where(label, row)}: conversational data needs a tokenizer with a chat template")
    try:
        return tok.apply_chat_template(messages, tokenize=False, **kwargs)
    except Exception as e:  # the template is the user's code: any failure is about their data or template
        reason = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"[:200]
        raise UserError(f"{where(label, row, key)}: the chat template failed ({reason})") from None


def render_chat(
    tok, prompt_msgs: list, response_msgs: list, label, row, key="chosen", prompt_key="prompt"
) -> tuple[str, str]:
    """(templated prompt, templated response) with the template's text for prompt + response split exactly;
    key / prompt_key name the fields in errors."""
    prompt_text = apply_template(tok, prompt_msgs, label, row, prompt_key, add_generation_prompt=True)
    full_text = apply_template(tok, prompt_msgs + response_msgs, label, row, key)
    if not full_text.startswith(prompt_text):
        raise UserError(
            f"{where(label, row, key)}: the chat template does not render the prompt as a prefix of prompt + response"
        )
    return prompt_text, full_text[len(prompt_text) :]


def tokenize_pair(tok, example: dict, label="", row=0, fields=PAIR_FIELDS) -> TokenizedPair:
    """One preference row -> untruncated token ids, each response ending in exactly one EOS. `fields`: the
    names of prompt, chosen and rejected in the user's file, for errors (KTO and SFT say 'completion')."""
    ex = explicit_prompt(example, label, row)
    if isinstance(ex["chosen"], list):
        # The template writes its own special tokens (BOS included) as text: don't add them again.
        prompt_key, chosen_key, rejected_key = fields
        if "prompt" not in example:
            prompt_key = chosen_key  # an implicit prompt is the beginning of chosen
        pc, chosen = render_chat(tok, ex["prompt"], ex["chosen"], label, row, chosen_key, prompt_key)
        pr, rejected = render_chat(tok, ex["prompt"], ex["rejected"], label, row, rejected_key, prompt_key)
        assert pc == pr
        prompt, special = pc, False
    else:
        prompt, chosen, rejected, special = ex["prompt"], ex["chosen"], ex["rejected"], True
    prompt_ids, chosen_ids = split_at_boundary(tok, prompt, chosen, special)
    _, rejected_ids = split_at_boundary(tok, prompt, rejected, special)
    if not prompt_ids and tok.bos_token_id is not None:
        prompt_ids = [tok.bos_token_id]  # the first response token needs something to be predicted from
    return TokenizedPair(prompt_ids, end_with_one_eos(tok, chosen_ids), end_with_one_eos(tok, rejected_ids), row)


def truncate(pair: TokenizedPair, max_length, max_prompt_length, truncation_mode):
    """TRL's rule: cut the prompt to max_prompt_length (keep_end / keep_start), then the responses' ends
    to fit max_length. Returns None when a response would be empty (the pair is dropped)."""
    p = pair.prompt_ids
    if max_prompt_length is not None and len(p) > max_prompt_length:
        p = p[-max_prompt_length:] if truncation_mode == "keep_end" else p[:max_prompt_length]
    c, r = pair.chosen_ids, pair.rejected_ids
    if max_length is not None:
        room = max_length - len(p)
        if room <= 0:
            return None
        c, r = c[:room], r[:room]
    if not p or not c or not r:
        return None
    return TokenizedPair(p, c, r, pair.row)


def tokenize_dataset(
    tok, rows, label, max_length=None, max_prompt_length=None, truncation_mode="keep_end", completions: bool = False
) -> tuple[list, TokenizeStats]:
    """Checked rows -> truncated TokenizedPairs; dropped rows are counted by reason. Rows are pairs
    (prompt, chosen, rejected), or with `completions` single completions (prompt, completion), kept as
    pairs whose chosen and rejected are both the completion (SFT's and KTO's examples)."""
    stats, out = TokenizeStats(), []
    what = "completion" if completions else "response"
    for row, example in rows:
        if completions:
            example = {"prompt": example["prompt"], "chosen": example["completion"], "rejected": example["completion"]}
        pair = tokenize_pair(tok, example, label, row, COMPLETION_FIELDS if completions else PAIR_FIELDS)
        if not pair.prompt_ids:
            stats.drop("with an empty prompt")
            continue
        if not completions and pair.chosen_ids == pair.rejected_ids:
            stats.drop("with chosen equal to rejected")
            continue
        t = truncate(pair, max_length, max_prompt_length, truncation_mode)
        if t is None:
            stats.drop(f"whose {what} would be empty after truncation")
            continue
        out.append(t)
    stats.kept = len(out)
    if not out:
        raise UserError(f"{label}: no usable {'examples' if completions else 'pairs'} ({stats.summary()})")
    return out, stats
