"""Many preference rows -> token ids at once, giving exactly tokenize.tokenize_pair's ids row by row.

tokenize_pair makes four tokenizer calls per pair (the prompt twice, prompt + chosen, prompt + rejected)
and renders the prompt's chat template twice. Here every row's texts are rendered first (the prompt
once), then tokenized in batch calls of the fast tokenizer (its Rust side runs a batch in parallel),
and the per-row boundary logic of tokenize.py runs on the results:

    rows -> pair_texts (template, implicit prompt) -> batch encodes: the prompts; for chats, the prompt's
            tail (from its last added token, e.g. <|im_start|>assistant) + each response (_tail_ids),
            else prompt + each response -> tokenize.response_after_prompt per response (keep the
            tail when the prompt's ids are a prefix, else tokenize the response as a continuation)
         -> end_with_one_eos, the BOS rule -> drop / truncate (tokenize_dataset's rule, keep_or_drop)

A chat prompt is thus tokenized once per pair, and the tokens encoded per pair fall from 3P + C + R to
about P + C + R. A batch encode gives the same ids as one call per text (the same function of each
string); tests/test_arrow_data.py checks the whole result against tokenize_pair + truncate on the
bundled data and on boundary cases (merges across the boundary, templates, BOS/EOS, implicit prompts).
"""

from types import SimpleNamespace

from dpokit.data.tokenize import (
    COMPLETION_FIELDS,
    PAIR_FIELDS,
    TokenizedPair,
    _one_bos,
    apply_template,
    end_with_one_eos,
    explicit_prompt,
    response_after_prompt,
    truncate,
)
from dpokit.errors import UserError, where

# dropped-row reasons, as tokenize_dataset counts them
EMPTY_PROMPT = "with an empty prompt"
SAME_RESPONSES = "with chosen equal to rejected"


def empty_after_truncation(completions: bool) -> str:
    return f"whose {'completion' if completions else 'response'} would be empty after truncation"


def pair_texts(tok, example: dict, label="", row=0, fields=PAIR_FIELDS) -> tuple:
    """(prompt, chosen, rejected, special): the texts tokenize_pair splits, with the chat template applied
    (the prompt rendered once) and `special` whether the tokenizer adds its special tokens. Errors name
    the same row and field as tokenize_pair's, in the same order."""
    ex = explicit_prompt(example, label, row)
    if not isinstance(ex["chosen"], list):
        return ex["prompt"], ex["chosen"], ex["rejected"], True
    prompt_key, chosen_key, rejected_key = fields
    if "prompt" not in example:
        prompt_key = chosen_key  # an implicit prompt is the beginning of chosen
    prompt_text = apply_template(tok, ex["prompt"], label, row, prompt_key, add_generation_prompt=True)
    responses = []
    for key in ("chosen", "rejected"):
        name = chosen_key if key == "chosen" else rejected_key
        full_text = apply_template(tok, ex["prompt"] + ex[key], label, row, name)
        if not full_text.startswith(prompt_text):
            raise UserError(
                f"{where(label, row, name)}: the chat template does not render the prompt as a prefix of "
                "prompt + response"
            )
        responses.append(full_text[len(prompt_text) :])
    return prompt_text, responses[0], responses[1], False


def _encode_many(tok, texts: list, special: bool, ids=None) -> list:
    if not texts:
        return []
    ids = ids or special_ids(tok)
    return [_one_bos(ids, list(x)) for x in tok(texts, add_special_tokens=special)["input_ids"]]


def split_tokens(tok) -> list:
    """(text, id) of the added tokens the tokenizer splits off the raw text before normalizing and
    pre-tokenizing it (a chat template's <|im_start|>, ...); BOS left out (see _one_bos)."""
    added = getattr(tok, "added_tokens_decoder", {}) or {}
    return [(t.content, i) for i, t in added.items() if t.content and not t.normalized and i != tok.bos_token_id]


def _last_split(text: str, tokens: list) -> tuple:
    """(position, text, id) of the added token that starts last in `text` (the longest on a tie), or (-1, ..)."""
    best = (-1, "", None)
    for content, i in tokens:
        p = text.rfind(content)
        if p > best[0] or (p == best[0] >= 0 and len(content) > len(best[1])):
            best = (p, content, i)
    return best


# Rows checked against the full encode in every batch that uses the tail encode (see _tail_ids)
VERIFY_ROWS = 4


def _tail_ids(tok, texts: list, idx: list, prompts: list, tokens: list) -> dict:
    """{i: (full_chosen_ids, full_rejected_ids)} for chat rows, from the prompt's own ids and an encode of
    only the prompt's tail: the tokenizer splits added tokens off the raw text first and tokenizes the
    pieces between them on their own, so tok(prompt + response) is the prompt's ids up to its last added
    token followed by tok(that token + the rest of the prompt + response). That token starts the piece, so
    the rest never sits at the start of the text (where a Metaspace 'first' scheme adds its marker). The
    prompt's own tail is re-encoded and compared with its ids, and the first VERIFY_ROWS rows are encoded
    in full as well: any disagreement and this batch is encoded in full (never a different id)."""
    plan = {}
    for k, i in enumerate(idx):
        prompt, prompt_ids = texts[i][0], prompts[k]
        pos, content, tid = _last_split(prompt, tokens)
        if pos < 0 or prompt_ids.count(tid) != prompt.count(content) or tid not in prompt_ids:
            continue
        cut = len(prompt_ids) - 1 - prompt_ids[::-1].index(tid)
        plan[i] = (k, cut, prompt[pos:])
    if not plan:
        return {}
    rows = list(plan)
    pieces = [plan[i][2] + x for i in rows for x in ("", texts[i][1], texts[i][2])]
    encoded = [list(ids) for ids in tok(pieces, add_special_tokens=False)["input_ids"]]  # (no BOS to cut)
    out = {}
    for n, i in enumerate(rows):
        k, cut, _ = plan[i]
        tail, chosen, rejected = encoded[3 * n : 3 * n + 3]
        head = prompts[k][:cut]
        if head + tail == prompts[k]:
            out[i] = (head + chosen, head + rejected)
    check = list(out)[:VERIFY_ROWS]
    if check:
        full = _encode_many(tok, [texts[i][0] + texts[i][j] for i in check for j in (1, 2)], False)
        if any(out[i] != (full[2 * n], full[2 * n + 1]) for n, i in enumerate(check)):
            return {}
    return out


def special_ids(tok) -> SimpleNamespace:
    """The token attributes the per-row rules read (bos/eos ids, eos text), read once: a transformers
    tokenizer's attribute lookup costs ~0.1 ms, as much as templating a row."""
    return SimpleNamespace(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, eos_token=tok.eos_token)


def tokenize_rows(tok, rows, label, completions: bool = False) -> list:
    """[(row, example)] -> [TokenizedPair] untruncated, as tokenize_pair gives them one by one."""
    ids = special_ids(tok)
    fields = COMPLETION_FIELDS if completions else PAIR_FIELDS
    texts = []
    for row, example in rows:
        if completions:
            example = {"prompt": example["prompt"], "chosen": example["completion"], "rejected": example["completion"]}
        texts.append(pair_texts(tok, example, label, row, fields))
    out = [None] * len(texts)
    for special in (True, False):  # (one kind per dataset in practice: strings add special tokens, chats don't)
        idx = [i for i, t in enumerate(texts) if t[3] == special]
        if not idx:
            continue
        prompts = _encode_many(tok, [texts[i][0] for i in idx], special, ids)
        # chats (no special tokens added): encode only the prompt's tail with each response
        tails = {} if special else _tail_ids(tok, texts, idx, prompts, split_tokens(tok))
        rest = [i for i in idx if i not in tails]
        chosen = dict(zip(rest, _encode_many(tok, [texts[i][0] + texts[i][1] for i in rest], special, ids)))
        rejected = dict(zip(rest, _encode_many(tok, [texts[i][0] + texts[i][2] for i in rest], special, ids)))
        for k, i in enumerate(idx):
            prompt, c_text, r_text, _ = texts[i]
            prompt_ids = prompts[k]
            full_c, full_r = tails[i] if i in tails else (chosen[i], rejected[i])
            c = response_after_prompt(tok, prompt_ids, full_c, c_text, special, ids)
            r = response_after_prompt(tok, prompt_ids, full_r, r_text, special, ids)
            if not prompt_ids and ids.bos_token_id is not None:
                prompt_ids = [ids.bos_token_id]  # the first response token needs something to be predicted from
            out[i] = TokenizedPair(prompt_ids, end_with_one_eos(ids, c), end_with_one_eos(ids, r), rows[i][0])
    return out


def keep_or_drop(pair, max_length, max_prompt_length, truncation_mode, completions: bool = False):
    """tokenize_dataset's rule for one pair: (the truncated pair, None) or (None, the reason it is dropped)."""
    if not pair.prompt_ids:
        return None, EMPTY_PROMPT
    if not completions and pair.chosen_ids == pair.rejected_ids:
        return None, SAME_RESPONSES
    t = truncate(pair, max_length, max_prompt_length, truncation_mode)
    if t is None:
        return None, empty_after_truncation(completions)
    return t, None
