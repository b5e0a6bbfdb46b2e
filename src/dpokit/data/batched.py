"""Many preference rows -> token ids at once, giving exactly tokenize.tokenize_pair's ids row by row.

tokenize_pair makes four tokenizer calls per pair (the prompt twice, prompt + chosen, prompt + rejected)
and renders the prompt's chat template twice. Here every row's texts are rendered first (the prompt
once), then each kind of text is tokenized in one batch call of the fast tokenizer (its Rust side does
the batch in parallel), and the per-row boundary logic of tokenize.py runs on the results:

    rows -> pair_texts (template, implicit prompt)  -> three batch encodes: prompts, prompt + chosen,
            prompt + rejected                        -> split_encoded per response (tokenize.py's rule:
            keep the tail when the prompt's ids are a prefix, else tokenize the response as a
            continuation) -> end_with_one_eos, the BOS rule -> drop / truncate (tokenize_dataset's rule)

A batch encode gives the same ids as one call per text (the tokenizer is the same function of each
string); tests/test_arrow_data.py checks the whole result against tokenize_pair + truncate on the
bundled data and on boundary cases (merges across the boundary, templates, BOS/EOS, implicit prompts).
"""

from dpokit.data.tokenize import (
    COMPLETION_FIELDS,
    PAIR_FIELDS,
    TokenizedPair,
    _one_bos,
    apply_template,
    continuation_ids,
    end_with_one_eos,
    explicit_prompt,
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


def split_encoded(tok, prompt_ids: list, full_ids: list, response: str, special: bool) -> list:
    """tokenize.split_at_boundary on ids already encoded (both with _one_bos applied): the response's ids."""
    if (
        special
        and tok.eos_token_id is not None
        and full_ids
        and full_ids[-1] == tok.eos_token_id
        and not response.endswith(tok.eos_token or "\0")
    ):
        full_ids = full_ids[:-1]  # tokenizers that append EOS themselves: we add our own below
    if full_ids[: len(prompt_ids)] == prompt_ids:
        return full_ids[len(prompt_ids) :]
    return continuation_ids(tok, response)  # a merge crossed the boundary


def _encode_many(tok, texts: list, special: bool) -> list:
    return [_one_bos(tok, list(ids)) for ids in tok(texts, add_special_tokens=special)["input_ids"]]


def tokenize_rows(tok, rows, label, completions: bool = False) -> list:
    """[(row, example)] -> [TokenizedPair] untruncated, as tokenize_pair gives them one by one."""
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
        prompts = _encode_many(tok, [texts[i][0] for i in idx], special)
        chosen = _encode_many(tok, [texts[i][0] + texts[i][1] for i in idx], special)
        rejected = _encode_many(tok, [texts[i][0] + texts[i][2] for i in idx], special)
        for k, i in enumerate(idx):
            prompt, c_text, r_text, _ = texts[i]
            prompt_ids = prompts[k]
            c = split_encoded(tok, prompt_ids, chosen[k], c_text, special)
            r = split_encoded(tok, prompt_ids, rejected[k], r_text, special)
            if not prompt_ids and tok.bos_token_id is not None:
                prompt_ids = [tok.bos_token_id]  # the first response token needs something to be predicted from
            out[i] = TokenizedPair(prompt_ids, end_with_one_eos(tok, c), end_with_one_eos(tok, r), rows[i][0])
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
