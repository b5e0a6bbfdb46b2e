"""Reading preference rows from files or `datasets`, and checking them before any work is done.

Sources: .jsonl, .json, .parquet and .csv files, a directory saved by `datasets` (or holding data
files), or a hub name. JSON lines and CSV are read here line by line (rather than through `datasets`)
so that a malformed line is reported with its own row number instead of a parser traceback. Text files
are UTF-8; a leading byte-order mark (Excel's "CSV UTF-8", Notepad) is dropped, not read as part of the
first column's name.

Formats (TRL's names):
  standard        prompt, chosen, rejected: strings
  conversational  prompt, chosen, rejected: lists of {"role", "content"} messages
  implicit prompt chosen, rejected only; the prompt is their longest common prefix (tokenize.py), which
                  must not be empty
The format is decided by every row, not the first: one row with a prompt makes a prompt required in all
(else the rows without one would silently train on implicit prompts, or the others' prompts be dropped).
Every problem is a UserError `file: row N: field 'x': what is wrong`. A field holds at most
MAX_FIELD_CHARS characters (MAX_FIELD_MESSAGES messages).
"""

import csv
import io
import json
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from dpokit.data.tokenize import explicit_prompt
from dpokit.errors import UserError, where

PAIR_FIELDS = ("prompt", "chosen", "rejected")
FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
BOM = "\ufeff"

# The most characters one field may hold: a string, or the roles and contents of a list of messages
# (~250k tokens). Tokenizing is linear but not cheap (about 0.5 s and 150 MB per million characters, and
# each pair is tokenized three times), and truncation to max_length happens on tokens: a 50 MB row took
# minutes and gigabytes to be cut to 512 tokens. A bigger field is refused at once, with its row and
# field, rather than cut as text, which could change the token ids a prompt keeps.
MAX_FIELD_CHARS = 1_000_000
# The most messages in one field: the chat template renders each (four times per pair) and adds its own
# markup, so 200,000 empty messages cost as much as 5 million characters.
MAX_FIELD_MESSAGES = 10_000


class MissingSplit(UserError):
    """The source exists but has no such split (a held-out split is optional)."""


@dataclass
class InMemory:
    """Rows the caller holds: a `datasets.Dataset` or `DatasetDict`, or a list of row dicts, with the
    name errors give it (e.g. `train_dataset: row 3: field 'prompt': missing`)."""

    data: object
    label: str


def named(source, label: str):
    """A path or name stays as it is; anything else is rows in memory, called `label` in errors."""
    return source if isinstance(source, (str, os.PathLike)) else InMemory(source, label)


def _read_in_memory(source: InMemory, split: str) -> tuple[list, str]:
    data, label = source.data, source.label
    if hasattr(data, "keys") and type(data) is not dict:  # a DatasetDict: one of its splits
        if split not in data:
            raise MissingSplit(f"{label}: no split '{split}' (has {', '.join(data)})")
        data, label = data[split], f"{label}[{split}]"
    if isinstance(data, dict):
        raise UserError(f"{label}: expected rows (a datasets.Dataset, DatasetDict or list of dicts), got a dict")
    try:
        rows = list(data)
    except TypeError:
        raise UserError(
            f"{label}: expected rows (a datasets.Dataset, DatasetDict or list of dicts), got {type(data).__name__}"
        ) from None
    for i, row in enumerate(rows, start=1):
        if not isinstance(row, dict):
            raise UserError(f"{where(label, i)}: expected a dict of fields, got {type(row).__name__}")
    return list(enumerate(rows, start=1)), label


def read_rows(source, split: str = "train") -> tuple[list, str]:
    """Rows of a file, a `datasets` directory, a hub name or an InMemory source, and a label for error
    messages."""
    if isinstance(source, InMemory):
        return _read_in_memory(source, split)
    path = Path(source).expanduser()
    if path.suffix in FILE_SUFFIXES:
        if not path.is_file():
            raise UserError(f"{path}: file not found")
        read = {".jsonl": _read_jsonl, ".json": _read_json, ".parquet": _read_parquet, ".csv": _read_csv}[path.suffix]
        try:
            return read(path), str(path)
        except OSError as e:  # permissions, a disk error: the file's problem, not ours
            raise UserError(f"{path}: cannot read ({e.strerror or e})") from None
    if path.is_dir():
        return _read_datasets_dir(path, split)
    if path.exists() or source.startswith((".", "/", "~")):
        raise UserError(f"{source}: unsupported data file (expected {', '.join(FILE_SUFFIXES)} or a directory)")
    return _read_hub(source, split), f"{source}[{split}]"


def _first_line(e: Exception, limit=200) -> str:
    """A foreign exception as a short one-line reason."""
    text = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {text}"[:limit]


def _decode(path, raw: bytes, row=None) -> str:
    """UTF-8 text without a leading byte-order mark."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        utf16 = raw[:2] in (b"\xff\xfe", b"\xfe\xff")
        hint = "; it starts with a UTF-16 byte-order mark: save it as UTF-8" if utf16 else ""
        raise UserError(f"{where(path, row)}: not valid UTF-8 (byte {e.start}{hint})") from None
    return text[1:] if text.startswith(BOM) else text


def _parse_json(text: str, place, lines=True):
    """json.loads with every way it fails on hostile text as one line at `place` (file, or file: row N)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        at = f"line {e.lineno} column {e.colno}" if lines else f"column {e.colno}"
        raise UserError(f"{place}: malformed JSON ({e.msg} at {at})") from None
    except RecursionError:  # the C parser recurses once per '[' or '{'
        raise UserError(f"{place}: JSON nested too deeply") from None
    except ValueError as e:  # an integer longer than Python converts (sys.set_int_max_str_digits)
        if "integer string conversion" in str(e):
            reason = f"an integer with more than {sys.get_int_max_str_digits()} digits"
        else:
            reason = _first_line(e)
        raise UserError(f"{place}: malformed JSON ({reason})") from None


def _read_jsonl(path: Path) -> list:
    rows = []
    with open(path, "rb") as f:
        for i, raw in enumerate(f, start=1):  # lines end at b"\n" only: U+2028 in a string is text
            line = _decode(path, raw, i).strip()  # (a BOM may begin any line of concatenated files)
            if not line:
                continue
            obj = _parse_json(line, where(path, i), lines=False)
            if not isinstance(obj, dict):
                raise UserError(f"{where(path, i)}: expected a JSON object, got {type(obj).__name__}")
            rows.append((i, obj))
    return rows


def _read_json(path: Path) -> list:
    text = _decode(path, path.read_bytes())
    if not text.strip():
        return []
    data = _parse_json(text, path)
    if isinstance(data, dict):  # {"train": [...]} or {"data": [...]}: a single list inside an object
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise UserError(
                f"{path}: expected a JSON list of objects (or an object holding one list; this one holds {len(lists)})"
            )
        data = lists[0]
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a JSON list of objects")
    for i, obj in enumerate(data, start=1):
        if not isinstance(obj, dict):
            raise UserError(f"{where(path, i)}: expected a JSON object, got {type(obj).__name__}")
    return list(enumerate(data, start=1))


@contextmanager
def _csv_cells_unbounded():
    """csv refuses cells over 131,072 characters: MAX_FIELD_CHARS, checked with the row and field, is
    the limit that applies. The setting is process-wide, so it is put back."""
    old = csv.field_size_limit()
    csv.field_size_limit(2**31 - 1)
    try:
        yield
    finally:
        csv.field_size_limit(old)


def _csv_records(path, text: str) -> list:
    """[(line the record starts on, cells)], blank lines included as []. csv splits the records itself
    (newline='' semantics): only \\n, \\r\\n and \\r end one, so U+2028, U+0085 or a form feed stay cell
    text (str.splitlines would split there), and a row number is the line a user sees. `strict` makes
    an unclosed quote an error instead of a cell that swallows the rest of the file."""
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    records, line = [], 1
    with _csv_cells_unbounded():
        while True:
            try:
                cells = next(reader)
            except StopIteration:
                return records
            except csv.Error as e:
                raise UserError(f"{where(path, line)}: malformed CSV ({e})") from None
            records.append((line, cells))
            line = reader.line_num + 1


def _read_csv(path: Path) -> list:
    """Rows keyed by the header's names; columns with an empty name (pandas' index) are left out."""
    records = _csv_records(path, _decode(path, path.read_bytes()))
    if not any(cells for _, cells in records):
        return []
    header_line, names = records[0]
    if not names:
        raise UserError(f"{where(path, header_line)}: the header line is empty (the first line must name the columns)")
    seen = set()
    for name in names:
        if name and name in seen:
            field = _printable(name, quotes=False)
            raise UserError(f"{where(path, header_line, field)}: column named twice in the header")
        seen.add(name)
    rows = []
    for line, cells in records[1:]:
        if not cells:
            continue  # a blank line
        if len(cells) > len(names):
            raise UserError(f"{where(path, line)}: more cells than columns in the header")
        row = dict.fromkeys(n for n in names if n)  # a short row's missing cells are None: "missing"
        row.update((n, c) for n, c in zip(names, cells) if n)
        rows.append((line, row))
    return rows


def _read_parquet(path: Path) -> list:
    import pyarrow.parquet as pq

    try:
        # to_pylist inside: values Python cannot hold (a timestamp past year 9999) fail there
        return list(enumerate(pq.read_table(path).to_pylist(), start=1))
    except Exception as e:  # pyarrow raises several types for a broken file
        raise UserError(f"{path}: cannot read Parquet ({_first_line(e)})") from None


def _split_of(ds, split, label):
    from datasets import DatasetDict

    if isinstance(ds, DatasetDict):
        if split not in ds:
            raise MissingSplit(f"{label}: no split '{split}' (has {', '.join(ds)})")
        ds = ds[split]
    return list(enumerate(ds, start=1))


def _load_saved(path: Path, split: str) -> list:
    """Rows of a `save_to_disk` directory. Whatever `datasets` raises on a damaged one (arrow files
    missing or garbage, a broken dataset_info.json / state.json / dataset_dict.json) is the directory's
    problem, reported as such; rows are read inside, where a truncated arrow file fails."""
    import datasets

    try:
        return _split_of(datasets.load_from_disk(str(path)), split, path)
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"{path}: cannot load saved dataset ({_first_line(e)})") from None


def _read_datasets_dir(path: Path, split: str) -> list:
    import datasets

    if (path / "dataset_dict.json").is_file() or (path / "dataset_info.json").is_file():
        return _load_saved(path, split), f"{path}[{split}]"
    data_files = sorted(p for p in path.iterdir() if p.suffix in FILE_SUFFIXES)
    if data_files:  # a plain folder of data files named by split: train.jsonl, test.jsonl, ...
        mine = [p for p in data_files if p.stem == split or p.stem.startswith(split + "-")]
        if not mine:
            raise MissingSplit(f"{path}: no '{split}' data file (has {', '.join(p.name for p in data_files)})")
        if len(mine) == 1:  # errors then name the file itself
            return read_rows(str(mine[0]))
        return [r for f in mine for r in read_rows(str(f))[0]], f"{path}[{split}]"
    try:
        return _split_of(datasets.load_dataset(str(path)), split, path), f"{path}[{split}]"
    except UserError:
        raise
    except Exception as e:  # other files `datasets` reads (.arrow, .txt, ...), broken in any way
        raise UserError(f"{path}: cannot load as a dataset ({_first_line(e)})") from None


def _read_hub(name: str, split: str) -> list:
    import datasets

    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # network, missing dataset, missing split: all user-facing
        raise UserError(f"{name}: cannot load dataset '{name}' split '{split}' ({_first_line(e)})") from None
    return list(enumerate(ds, start=1))


# ---------------------------------------------------------------------------------------------------


def _printable(name, limit=60, quotes=True) -> str:
    """A user's column name or value for a one-line message: escaped (newlines, lone surrogates), cut."""
    text = repr(name) if quotes or not isinstance(name, str) else repr(name)[1:-1]
    return text[:limit] + "..." if len(text) > limit else text


def _near_miss(obj, key):
    """A column named like `key` but for case, spaces or a byte-order mark ('Prompt', ' chosen'), or None."""
    return next((k for k in obj if isinstance(k, str) and k != key and k.strip(" \t" + BOM).lower() == key), None)


def _missing(label, row, key, obj, need="") -> UserError:
    """`key` absent from a row: say which column looks like it, or list the columns."""
    names = [k for k in obj if isinstance(k, str)]
    near = _near_miss(obj, key)
    if near is not None:
        why = f"found {_printable(near)}: column names are case- and space-sensitive"
    else:
        shown = ", ".join(_printable(k) for k in names[:20]) + (", ..." if len(names) > 20 else "")
        why = f"columns: {shown or 'none'}"
        if len(names) == 1 and any(sep in names[0] for sep in ";\t|"):
            why += "; is the file separated by something else than commas?"
    return UserError(f"{where(label, row, key)}: missing ({need + '; ' if need else ''}{why})")


def _check_messages(label, row, key, value):
    if not value:
        raise UserError(f"{where(label, row, key)}: empty list of messages")
    for m in value:
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise UserError(f"{where(label, row, key)}: each message needs 'role' and 'content'")
        if not isinstance(m["role"], str) or not isinstance(m["content"], str):
            raise UserError(f"{where(label, row, key)}: message role and content must be strings")


def _check_size(label, row, key, size, what="characters", limit=MAX_FIELD_CHARS, name="MAX_FIELD_CHARS"):
    if size > limit:
        raise UserError(
            f"{where(label, row, key)}: {size:,} {what}, over the limit of {limit:,} "
            f"(dpokit.data.load.{name}; it would be cut to max_length tokens anyway)"
        )


def _check_encodable(label, row, key, text):
    """JSON can write a lone surrogate ("\\ud800"): no character, so no tokenizer can encode it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise UserError(
            f"{where(label, row, key)}: contains a lone surrogate {_printable(text[e.start])} at "
            f"character {e.start} (a broken \\u escape: not a character)"
        ) from None


def check_field(label, row, key, value, kind):
    """kind: 'str' or 'messages'; a missing, empty, mistyped, oversized or unencodable value is an error
    naming the field."""
    if value is None:
        raise UserError(f"{where(label, row, key)}: missing")
    if kind == "str":
        if not isinstance(value, str):
            raise UserError(f"{where(label, row, key)}: expected a string, got {type(value).__name__}")
        _check_size(label, row, key, len(value))
        if not value.strip():
            raise UserError(f"{where(label, row, key)}: empty string")
        _check_encodable(label, row, key, value)
    else:
        if not isinstance(value, list):
            raise UserError(f"{where(label, row, key)}: expected a list of messages, got {type(value).__name__}")
        _check_messages(label, row, key, value)
        _check_size(label, row, key, len(value), "messages", MAX_FIELD_MESSAGES, "MAX_FIELD_MESSAGES")
        _check_size(label, row, key, sum(len(m["role"]) + len(m["content"]) for m in value))
        for m in value:
            _check_encodable(label, row, key, m["role"])
            _check_encodable(label, row, key, m["content"])


def _kind(rows, key) -> str:
    """'messages' or 'str': that of the first row whose `key` is either (the others must follow it)."""
    for _, obj in rows:
        if isinstance(obj.get(key), (str, list)):
            return "messages" if isinstance(obj[key], list) else "str"
    return "str"


def _first_with(rows, key):
    """The number of the first row holding `key` (one with a value, if any has), or None."""
    having = [row for row, obj in rows if key in obj]
    valued = [row for row, obj in rows if obj.get(key) is not None]
    return (valued or having or [None])[0]


def load_pairs(source: str, split: str = "train") -> tuple[list, str, str]:
    """Checked preference rows: (rows as (row_number, {prompt?, chosen, rejected}), label, format).

    The format is decided by every row: if any row has a prompt, every row must; the kind (strings or
    messages) is that of the first row's chosen, and every field of every row must be of that kind. An
    implicit prompt (the common beginning of chosen and rejected) must not be empty.
    """
    rows, label = read_rows(source, split)
    if not rows:
        raise UserError(f"{label}: no rows")
    with_prompt = _first_with(rows, "prompt")
    keys = PAIR_FIELDS if with_prompt is not None else PAIR_FIELDS[1:]
    kind = _kind(rows, "chosen")
    out = []
    for row, obj in rows:
        for key in keys:
            if key not in obj:
                need = f"row {with_prompt} has one, so every row needs one" if key == "prompt" else ""
                raise _missing(label, row, key, obj, need)
        if with_prompt is None and _near_miss(obj, "prompt") is not None:
            raise _missing(label, row, "prompt", obj)  # a 'Prompt' column: not an implicit-prompt row
        for key in keys:
            check_field(label, row, key, obj[key], kind)
        if with_prompt is None:
            explicit_prompt(obj, label, row)  # raises when chosen and rejected share no prompt
        out.append((row, {k: obj[k] for k in keys}))
    fmt = "conversational" if kind == "messages" else "standard"
    return out, label, fmt if with_prompt is not None else fmt + "+implicit_prompt"


def _check_label(label, row, value) -> bool:
    """KTO labels: JSON booleans, 0/1, or 'true'/'false' (CSV cells are strings)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
        return value.strip().lower() in ("true", "1")
    if value is None:
        raise UserError(f"{where(label, row, 'label')}: missing")
    raise UserError(f"{where(label, row, 'label')}: expected true or false, got {_printable(value)}")


def load_unpaired(source: str, split: str = "train") -> tuple[list, str, str]:
    """Checked unpaired rows for KTO: (row_number, {prompt, completion, label (bool)}); every row needs
    all three, and prompt and completion are of the first row's kind (strings or messages)."""
    rows, label = read_rows(source, split)
    if not rows:
        raise UserError(f"{label}: no rows")
    kind = _kind(rows, "completion")
    out = []
    for row, obj in rows:
        for key in ("prompt", "completion", "label"):
            if key not in obj:
                raise _missing(label, row, key, obj, "unpaired data for kto needs prompt, completion, label")
        for key in ("prompt", "completion"):
            check_field(label, row, key, obj[key], kind)
        out.append(
            (
                row,
                {
                    "prompt": obj["prompt"],
                    "completion": obj["completion"],
                    "label": _check_label(label, row, obj["label"]),
                },
            )
        )
    if len({r["label"] for _, r in out}) < 2:
        log_kind = "desirable" if out[0][1]["label"] else "undesirable"
        raise UserError(f"{label}: every example is {log_kind}; kto needs both labels")
    return out, label, "conversational" if kind == "messages" else "standard"
