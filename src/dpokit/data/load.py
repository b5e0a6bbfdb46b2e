"""Reading preference rows from files or `datasets`, and checking them before any work is done.

Sources: .jsonl, .json, .parquet and .csv files, a directory saved by `datasets` (or holding data
files), or a hub name. JSON lines and CSV are read here line by line (rather than through `datasets`)
so that a malformed line is reported with its own row number instead of a parser traceback.

Formats (TRL's names):
  standard        prompt, chosen, rejected: strings
  conversational  prompt, chosen, rejected: lists of {"role", "content"} messages
  implicit prompt chosen, rejected only; the prompt is their longest common prefix (tokenize.py)
Every problem is a UserError `file: row N: field 'x': what is wrong`.
"""

import csv
import json
from pathlib import Path

from dpokit.errors import UserError, where

PAIR_FIELDS = ("prompt", "chosen", "rejected")


class MissingSplit(UserError):
    """The source exists but has no such split (a held-out split is optional)."""
FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")


def read_rows(source: str, split: str = "train") -> tuple[list, str]:
    """Rows of a file, a `datasets` directory or a hub name, and a label for error messages."""
    path = Path(source).expanduser()
    if path.suffix in FILE_SUFFIXES:
        if not path.is_file():
            raise UserError(f"{path}: file not found")
        return {".jsonl": _read_jsonl, ".json": _read_json, ".parquet": _read_parquet,
                ".csv": _read_csv}[path.suffix](path), str(path)
    if path.is_dir():
        return _read_datasets_dir(path, split)
    if path.exists() or source.startswith((".", "/", "~")):
        raise UserError(f"{source}: unsupported data file (expected {', '.join(FILE_SUFFIXES)} or a directory)")
    return _read_hub(source, split), f"{source}[{split}]"


def _decode(path, raw: bytes, row=None) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{where(path, row)}: not valid UTF-8 (byte {e.start})") from None


def _read_jsonl(path: Path) -> list:
    rows = []
    with open(path, "rb") as f:
        for i, raw in enumerate(f, start=1):
            line = _decode(path, raw, i).strip()
            if not line:
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{where(path, i)}: malformed JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise UserError(f"{where(path, i)}: expected a JSON object, got {type(obj).__name__}")
            rows.append((i, obj))
    return rows


def _read_json(path: Path) -> list:
    text = _decode(path, path.read_bytes())
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: malformed JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    if isinstance(data, dict):  # {"train": [...]} or {"data": [...]}: a single list inside an object
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise UserError(f"{path}: expected a JSON list of objects")
        data = lists[0]
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a JSON list of objects")
    for i, obj in enumerate(data, start=1):
        if not isinstance(obj, dict):
            raise UserError(f"{where(path, i)}: expected a JSON object, got {type(obj).__name__}")
    return list(enumerate(data, start=1))


def _read_csv(path: Path) -> list:
    text = _decode(path, path.read_bytes())
    try:
        reader = csv.DictReader(text.splitlines(keepends=True))
        rows = []
        for obj in reader:
            if None in obj:  # more cells than header names
                raise UserError(f"{where(path, reader.line_num)}: more cells than columns in the header")
            rows.append((reader.line_num, obj))
    except csv.Error as e:
        raise UserError(f"{path}: malformed CSV ({e})") from None
    return rows


def _read_parquet(path: Path) -> list:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for a broken file
        raise UserError(f"{path}: cannot read Parquet ({str(e).splitlines()[0]})") from None
    return list(enumerate(table.to_pylist(), start=1))


def _split_of(ds, split, label):
    from datasets import DatasetDict

    if isinstance(ds, DatasetDict):
        if split not in ds:
            raise MissingSplit(f"{label}: no split '{split}' (has {', '.join(ds)})")
        ds = ds[split]
    return list(enumerate(ds, start=1))


def _read_datasets_dir(path: Path, split: str) -> list:
    import datasets

    if (path / "dataset_dict.json").is_file() or (path / "dataset_info.json").is_file():
        return _split_of(datasets.load_from_disk(str(path)), split, path), f"{path}[{split}]"
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
    except (FileNotFoundError, ValueError) as e:
        raise UserError(f"{path}: cannot load as a dataset ({str(e).splitlines()[0]})") from None


def _read_hub(name: str, split: str) -> list:
    import datasets

    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # network, missing dataset, missing split: all user-facing
        raise UserError(f"{name}: cannot load dataset '{name}' split '{split}' ({str(e).splitlines()[0]})") from None
    return list(enumerate(ds, start=1))


# ---------------------------------------------------------------------------------------------------

def _check_messages(label, row, key, value):
    if not value:
        raise UserError(f"{where(label, row, key)}: empty list of messages")
    for m in value:
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise UserError(f"{where(label, row, key)}: each message needs 'role' and 'content'")
        if not isinstance(m["role"], str) or not isinstance(m["content"], str):
            raise UserError(f"{where(label, row, key)}: message role and content must be strings")


def check_field(label, row, key, value, kind):
    """kind: 'str' or 'messages'; a missing, empty, or mistyped value is an error naming the field."""
    if value is None:
        raise UserError(f"{where(label, row, key)}: missing")
    if kind == "str":
        if not isinstance(value, str):
            raise UserError(f"{where(label, row, key)}: expected a string, got {type(value).__name__}")
        if not value.strip():
            raise UserError(f"{where(label, row, key)}: empty string")
    else:
        if not isinstance(value, list):
            raise UserError(f"{where(label, row, key)}: expected a list of messages, got {type(value).__name__}")
        _check_messages(label, row, key, value)


def load_pairs(source: str, split: str = "train") -> tuple[list, str, str]:
    """Checked preference rows: (rows as (row_number, {prompt?, chosen, rejected}), label, format).

    The format ('standard' or 'conversational', implicit prompt or not) is decided by the first row;
    every row must follow it.
    """
    rows, label = read_rows(source, split)
    if not rows:
        raise UserError(f"{label}: no rows")
    first_row, first = rows[0]
    for key in ("chosen", "rejected"):
        if key not in first:
            raise UserError(f"{where(label, first_row, key)}: missing (columns: {', '.join(map(str, first))})")
    kind = "messages" if isinstance(first["chosen"], list) else "str"
    has_prompt = "prompt" in first
    out = []
    for row, obj in rows:
        keys = PAIR_FIELDS if has_prompt else PAIR_FIELDS[1:]
        for key in keys:
            check_field(label, row, key, obj.get(key), kind)
        out.append((row, {k: obj[k] for k in keys}))
    fmt = ("conversational" if kind == "messages" else "standard") + ("" if has_prompt else "+implicit_prompt")
    return out, label, fmt


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
    raise UserError(f"{where(label, row, 'label')}: expected true or false, got {value!r}")


def load_unpaired(source: str, split: str = "train") -> tuple[list, str, str]:
    """Checked unpaired rows for KTO: (row_number, {prompt, completion, label (bool)})."""
    rows, label = read_rows(source, split)
    if not rows:
        raise UserError(f"{label}: no rows")
    first_row, first = rows[0]
    for key in ("prompt", "completion", "label"):
        if key not in first:
            raise UserError(f"{where(label, first_row, key)}: missing (unpaired data for kto needs prompt, "
                            f"completion, label; columns: {', '.join(map(str, first))})")
    kind = "messages" if isinstance(first["completion"], list) else "str"
    out = []
    for row, obj in rows:
        for key in ("prompt", "completion"):
            check_field(label, row, key, obj.get(key), kind)
        out.append((row, {"prompt": obj["prompt"], "completion": obj["completion"],
                          "label": _check_label(label, row, obj.get("label"))}))
    if len({r["label"] for _, r in out}) < 2:
        log_kind = "desirable" if out[0][1]["label"] else "undesirable"
        raise UserError(f"{label}: every example is {log_kind}; kto needs both labels")
    return out, label, "conversational" if kind == "messages" else "standard"
