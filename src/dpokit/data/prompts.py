"""Rows that are not preference pairs: prompts alone (`dpokit generate`, `dpokit rl`) and
prompt/completion demonstrations (`dpokit sft`), checked with the same one-line errors as load.py.

Prompt rows (generate, rl), decided by the first row:
  prompt              a string, or a list of {"role", "content"} messages
  messages            a conversation; the prompt is every message before its last assistant turn (the
                      whole conversation if it ends with a user turn)
  chosen, rejected    preference rows without a prompt: the prompt is their common prefix
Identical prompts are kept once (a preference file repeats a prompt for each of its pairs).

Demonstration rows (sft), decided by the first row:
  prompt, completion  strings, or lists of messages (conversational)
  messages            a conversation; its last assistant turn is the target, everything before it the prompt
  chosen (+ prompt)   preference rows: the chosen response is the target (rejected is ignored)

Prompts are tokenized exactly as `tokenize.tokenize_pair` tokenizes them, so that what generation is
fed is what training conditions on.
"""

import json

from dpokit.data.load import check_field, load_pairs, read_rows
from dpokit.data.tokenize import TokenizeStats, apply_template, explicit_prompt, split_at_boundary, tokenize_dataset
from dpokit.errors import UserError, where


def _last_assistant(label, row, messages) -> int:
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not turns:
        raise UserError(f"{where(label, row, 'messages')}: no assistant turn")
    return turns[-1]


def _first(rows, label):
    if not rows:
        raise UserError(f"{label}: no rows")
    return rows[0]


def load_prompts(source: str, split: str = "train") -> tuple[list, str]:
    """Checked, de-duplicated prompts: ([(row_number, prompt)], label); a prompt is a string or messages."""
    rows, label = read_rows(source, split)
    first_row, first = _first(rows, label)
    out = []
    if "prompt" in first:
        kind = "messages" if isinstance(first["prompt"], list) else "str"
        for row, obj in rows:
            check_field(label, row, "prompt", obj.get("prompt"), kind)
            out.append((row, obj["prompt"]))
    elif "messages" in first:
        for row, obj in rows:
            msgs = obj.get("messages")
            check_field(label, row, "messages", msgs, "messages")
            end = _last_assistant(label, row, msgs) if msgs[-1]["role"] == "assistant" else len(msgs)
            if end == 0:
                raise UserError(f"{where(label, row, 'messages')}: no prompt before the assistant turn")
            out.append((row, msgs[:end]))
    elif "chosen" in first:
        pairs, _, _ = load_pairs(source, split)
        out = [(row, explicit_prompt(ex)["prompt"]) for row, ex in pairs]
    else:
        raise UserError(
            f"{where(label, first_row)}: no 'prompt' or 'messages' column (columns: {', '.join(map(str, first))})"
        )
    seen, unique = set(), []
    for row, prompt in out:
        key = json.dumps(prompt, sort_keys=True)
        if key not in seen:
            seen.add(key)
            unique.append((row, prompt))
    return unique, label


def load_demonstrations(source: str, split: str = "train") -> tuple[list, str, str]:
    """Checked SFT rows: ([(row_number, {prompt, completion})], label, format); prompt and completion are
    both strings or both lists of messages."""
    rows, label = read_rows(source, split)
    first_row, first = _first(rows, label)
    out = []
    if "messages" in first:
        for row, obj in rows:
            msgs = obj.get("messages")
            check_field(label, row, "messages", msgs, "messages")
            i = _last_assistant(label, row, msgs)
            if i == 0:
                raise UserError(f"{where(label, row, 'messages')}: no prompt before the assistant turn")
            out.append((row, {"prompt": msgs[:i], "completion": [msgs[i]]}))
        return out, label, "conversational (messages)"
    if "completion" in first:
        kind = "messages" if isinstance(first["completion"], list) else "str"
        for row, obj in rows:
            for key in ("prompt", "completion"):
                check_field(label, row, key, obj.get(key), kind)
            out.append((row, {"prompt": obj["prompt"], "completion": obj["completion"]}))
        return out, label, "conversational" if kind == "messages" else "standard"
    if "chosen" in first:
        if "rejected" not in first and "prompt" in first:  # prompt + chosen only
            kind = "messages" if isinstance(first["chosen"], list) else "str"
            for row, obj in rows:
                for key in ("prompt", "chosen"):
                    check_field(label, row, key, obj.get(key), kind)
                out.append((row, {"prompt": obj["prompt"], "completion": obj["chosen"]}))
        else:
            pairs, label, _ = load_pairs(source, split)
            for row, ex in pairs:
                ex = explicit_prompt(ex)
                out.append((row, {"prompt": ex["prompt"], "completion": ex["chosen"]}))
        return out, label, "preference rows (chosen as the target)"
    raise UserError(
        f"{where(label, first_row)}: expected columns prompt+completion, messages, or "
        f"prompt+chosen (columns: {', '.join(map(str, first))})"
    )


def tokenize_demonstrations(
    tok, rows, label, max_length, max_prompt_length, truncation_mode="keep_end"
) -> tuple[list, TokenizeStats]:
    """Demonstrations -> TokenizedPairs whose chosen_ids is the completion (rejected_ids the same list),
    boundary-exact, the completion ending in one EOS; truncated as in DPO."""
    return tokenize_dataset(tok, rows, label, max_length, max_prompt_length, truncation_mode, completions=True)


def tokenize_prompt(tok, prompt, label="", row=0) -> list:
    """A prompt (string or messages) -> the token ids generation is fed: those of tokenize_pair's prompt."""
    if isinstance(prompt, list):
        text, special = apply_template(tok, prompt, label, row, "prompt", add_generation_prompt=True), False
    else:
        text, special = prompt, True
    ids = split_at_boundary(tok, text, "", special)[0]
    if not ids and tok.bos_token_id is not None:
        ids = [tok.bos_token_id]
    return ids


def truncate_prompt(ids: list, max_prompt_length, truncation_mode) -> list:
    if max_prompt_length is not None and len(ids) > max_prompt_length:
        return ids[-max_prompt_length:] if truncation_mode == "keep_end" else ids[:max_prompt_length]
    return ids


def response_message(prompt, response: str):
    """A response in the prompt's format: the text itself, or one assistant message for a conversation."""
    return [{"role": "assistant", "content": response}] if isinstance(prompt, list) else response
