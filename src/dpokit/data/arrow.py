"""Preference data as a memory-mapped Arrow table, tokenized once per fingerprint and cached.

    source (file, folder, hub name, Dataset, list)
      -> checked rows              load.load_pairs: file / row / field errors, before anything is written
      -> Dataset of rows           `row` (the user's row number) and the checked fields, pickled as they
                                   were read (Arrow would unify the keys of messages across rows, filling
                                   None into messages that lack a key; a chat template can see that)
      -> tokenized Dataset         Dataset.map(batched, num_proc): batched.tokenize_rows + keep_or_drop
                                   -> prompt_ids, chosen_ids, rejected_ids (int32 lists), dropped (reason)
      -> PairTable                 the kept rows, read one pair at a time from the memory-mapped table

The tokenized table is saved under `$DPOKIT_CACHE/tokenized/<key>/` (default ~/.cache/dpokit), where the
key hashes everything the ids depend on: the source's content (the bytes of its files, a `datasets`
fingerprint, or the pickled rows of a list), the split, the tokenizer (its whole tokenizer.json, special
tokens and chat template), max_length, max_prompt_length, truncation_mode and PREP_VERSION. A second run on
the same data opens the table and tokenizes nothing (not even reading the rows). Under torchrun, rank 0
prepares while the others wait, then they open its cache (one host, or a cache on a shared filesystem).

Training holds no Python list of ids: a PairTable reads pair i from the mapped file when the batch that
needs it is built, so resident memory does not grow with the dataset (the page cache holds what is read).
"""

import atexit
import hashlib
import json
import os
import pickle
import shutil
import tempfile
from pathlib import Path

import numpy as np

from dpokit.data.batched import keep_or_drop, tokenize_rows
from dpokit.data.load import FILE_SUFFIXES, InMemory, load_pairs
from dpokit.data.tokenize import TokenizedPair, TokenizeStats
from dpokit.errors import UserError

# bump when the ids a given input produces change (then every old cache entry is a miss, never stale)
PREP_VERSION = 1
ID_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")
# below this many rows per process, forking workers costs more than it saves
MIN_ROWS_PER_PROCESS = 2000
MAP_BATCH = 500


def tokenized_cache_dir() -> Path:
    return Path(os.environ.get("DPOKIT_CACHE", Path.home() / ".cache" / "dpokit")) / "tokenized"


# --- fingerprints ------------------------------------------------------------------------------------


def _hash_file(h, path: Path):
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)


def source_digest(source, split: str):
    """A hash of the source's content for `split`, or None when it has none we can take cheaply and
    surely (then nothing is cached). A path that does not exist gets None: load_pairs says why."""
    h = hashlib.sha256(f"split={split}|".encode())
    if isinstance(source, InMemory):
        data = source.data
        if hasattr(data, "keys") and type(data) is not dict:  # DatasetDict
            if split not in data:
                return None
            data = data[split]
        fp = getattr(data, "_fingerprint", None)
        if fp is not None:
            h.update(f"dataset:{fp}".encode())
            return h.hexdigest()
        try:
            h.update(pickle.dumps(data, protocol=5))
        except Exception:  # rows holding something unpicklable: just don't cache them
            return None
        return h.hexdigest()
    path = Path(source).expanduser()
    if path.is_file() and path.suffix in FILE_SUFFIXES:
        h.update(path.suffix.encode())
        _hash_file(h, path)
        return h.hexdigest()
    if path.is_dir():  # a save_to_disk directory or a folder of split files: every file in it
        for p in sorted(path.rglob("*")):
            rel = p.relative_to(path)
            if p.is_file() and not any(part.startswith(".") for part in rel.parts):
                h.update(f"|{rel.as_posix()}|".encode())
                _hash_file(h, p)
        return h.hexdigest()
    if path.exists() or str(source).startswith((".", "/", "~")):
        return None
    try:  # a hub name: `datasets` caches the download and fingerprints its content
        import datasets

        fp = datasets.load_dataset(str(source), split=split)._fingerprint
    except Exception:
        return None  # load_pairs reports why it cannot be loaded
    h.update(f"hub:{source}:{fp}".encode())
    return h.hexdigest()


def tokenizer_digest(tok) -> str:
    """Everything about the tokenizer that decides ids: its tokenizer.json (model, normalizer, pre- and
    post-processing: the BOS it adds), special tokens, and the chat template."""
    h = hashlib.sha256(type(tok).__name__.encode())
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(repr(sorted(tok.get_vocab().items())).encode())
    h.update(repr((tok.chat_template, tok.bos_token_id, tok.eos_token_id, tok.eos_token)).encode())
    h.update(repr(sorted((k, str(v)) for k, v in tok.special_tokens_map.items())).encode())
    return h.hexdigest()


def cache_key(source_hash, tok, max_length, max_prompt_length, truncation_mode, completions) -> str:
    parts = [PREP_VERSION, source_hash, tokenizer_digest(tok), max_length, max_prompt_length, truncation_mode]
    return hashlib.sha256(json.dumps([*parts, completions]).encode()).hexdigest()[:32]


# --- the table training reads --------------------------------------------------------------------------


class PairTable:
    """The kept pairs of a tokenized table, as a read-only sequence of TokenizedPair: `table[i]` reads row i
    from the memory-mapped Arrow file; a slice is a list. Reference log-probs (refcache) are kept beside
    the table in two float arrays, not on the (short-lived) pair objects."""

    def __init__(self, ds):
        import pyarrow.compute as pc

        self.ds = ds.select_columns(["row", *ID_COLUMNS])
        dropped = ds.data.column("dropped")
        self.index = np.flatnonzero(pc.equal(dropped, "").to_numpy(zero_copy_only=False))
        self.reference = None  # (chosen (N,), rejected (N,)) float64 arrays, or None

    def __len__(self):
        return len(self.index)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        r = self.ds[int(self.index[i])]
        pair = TokenizedPair(r["prompt_ids"], r["chosen_ids"], r["rejected_ids"], r["row"])
        if self.reference is not None:
            pair.reference_logps = (float(self.reference[0][i]), float(self.reference[1][i]))
        return pair

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def lengths(self) -> tuple:
        """(prompt, chosen, rejected) token counts of every kept pair: (N,) int64 arrays, read from the
        table's list offsets (no ids are converted to Python)."""
        import pyarrow.compute as pc

        table = self.ds.data
        return tuple(pc.list_value_length(table.column(c)).to_numpy()[self.index].astype(np.int64) for c in ID_COLUMNS)

    def set_reference_logps(self, chosen, rejected):
        self.reference = (np.asarray(chosen, dtype=np.float64), np.asarray(rejected, dtype=np.float64))


# --- preparing --------------------------------------------------------------------------------------------


def _tokenize_batch(batch, tok, label, max_length, max_prompt_length, truncation_mode, completions):
    rows = [(row, pickle.loads(ex)) for row, ex in zip(batch["row"], batch["example"])]
    out = {c: [] for c in ID_COLUMNS} | {"dropped": []}
    for pair in tokenize_rows(tok, rows, label, completions):
        kept, reason = keep_or_drop(pair, max_length, max_prompt_length, truncation_mode, completions)
        out["prompt_ids"].append(kept.prompt_ids if kept else [])
        out["chosen_ids"].append(kept.chosen_ids if kept else [])
        out["rejected_ids"].append(kept.rejected_ids if kept else [])
        out["dropped"].append(reason or "")
    return out


def _stats(ds) -> TokenizeStats:
    from collections import Counter

    reasons = Counter(ds.data.column("dropped").to_pylist())
    stats = TokenizeStats()
    stats.kept = reasons.pop("", 0)
    stats.dropped = dict(reasons)
    return stats


def _rows_table(rows: list, path: Path, n: int):
    """The checked rows as a memory-mapped Dataset of (row, pickled fields), written in record batches
    (the Arrow stream format `datasets` maps): no second in-memory copy of the data, and map's workers
    read their shards from the file instead of receiving them pickled. Each row's objects are freed
    once written."""
    import pyarrow as pa
    from datasets import Dataset

    schema = pa.schema([("row", pa.int64()), ("example", pa.large_binary())])
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        for start in range(0, n, MAP_BATCH):
            chunk = range(start, min(start + MAP_BATCH, n))
            numbers = pa.array([rows[i][0] for i in chunk], pa.int64())
            pickled = pa.array([pickle.dumps(rows[i][1], 5) for i in chunk], pa.large_binary())
            writer.write_batch(pa.record_batch([numbers, pickled], schema=schema))
            for i in chunk:
                rows[i] = None
    return Dataset.from_file(str(path))


def _num_proc(num_proc, n_rows: int) -> int:
    if num_proc is not None:
        return max(1, min(num_proc, n_rows))
    return max(1, min(os.cpu_count() or 1, n_rows // MIN_ROWS_PER_PROCESS))


def _open(directory: Path):
    from datasets import Dataset, concatenate_datasets

    files = sorted(directory.glob("tokens*.arrow"))  # (shards of a num_proc map, in order)
    parts = [Dataset.from_file(str(f)) for f in files]
    return parts[0] if len(parts) == 1 else concatenate_datasets(parts)


def tokenize_to_table(
    tok,
    source,
    split="train",
    max_length=None,
    max_prompt_length=None,
    truncation_mode="keep_end",
    num_proc=None,
    use_cache=True,
):
    """(PairTable, label, format, TokenizeStats) of the preference pairs of `source`'s split: the ids of
    tokenize_dataset(tok, load_pairs(source, split)...), from the cache when this input was seen before."""
    from datasets import Features, Sequence, Value, disable_progress_bars

    disable_progress_bars()  # (dpokit logs a summary line instead)
    key = None
    if use_cache:
        digest = source_digest(source, split)
        if digest is not None:
            key = cache_key(digest, tok, max_length, max_prompt_length, truncation_mode, False)
    final = tokenized_cache_dir() / key if key else None
    if final is not None and (final / "meta.json").is_file():
        meta = json.loads((final / "meta.json").read_text())
        ds = _open(final)
        stats = TokenizeStats(meta["kept"], meta["dropped"])
        return PairTable(ds), meta["label"], meta["format"], stats

    rows, label, fmt = load_pairs(source, split)  # every error about the data is raised here
    if final is not None:
        final.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=final.parent))  # same filesystem: rename is atomic
    else:  # not cached: the table still lives on disk (mapped) for this process only
        work = Path(tempfile.mkdtemp(prefix="dpokit-tokens-"))
        atexit.register(shutil.rmtree, work, True)
    try:
        rows_ds = _rows_table(rows, work / "rows.arrow", len(rows))
        del rows
        features = Features(
            {"row": Value("int64"), **{c: Sequence(Value("int32")) for c in ID_COLUMNS}, "dropped": Value("string")}
        )
        ds = rows_ds.map(
            _tokenize_batch,
            batched=True,
            batch_size=MAP_BATCH,
            fn_kwargs=dict(
                tok=tok,
                label=label,
                max_length=max_length,
                max_prompt_length=max_prompt_length,
                truncation_mode=truncation_mode,
                completions=False,
            ),
            remove_columns=["example"],
            features=features,
            num_proc=_num_proc(num_proc, len(rows_ds)),
            cache_file_name=str(work / "tokens.arrow"),
        )
        del rows_ds
        (work / "rows.arrow").unlink()
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    stats = _stats(ds)
    if stats.kept == 0:
        shutil.rmtree(work, ignore_errors=True)
        raise UserError(f"{label}: no usable pairs ({stats.summary()})")
    if final is not None:
        for extra in work.glob("cache-*"):  # (datasets' own leftovers, if any)
            extra.unlink()
        meta = {"label": label, "format": fmt, "kept": stats.kept, "dropped": stats.dropped, "version": PREP_VERSION}
        (work / "meta.json").write_text(json.dumps(meta))
        try:
            work.rename(final)  # whole or not at all: a reader sees meta.json only in a finished directory
        except OSError:  # another process finished the same key first: theirs is as good
            shutil.rmtree(work, ignore_errors=True)
        ds = _open(final)
    return PairTable(ds), label, fmt, stats


def prepare_once(fn):
    """fn() on every rank, rank 0 first: the others wait, then find its cache. A rank-0 error stops every
    rank (the others with a one-line error pointing at rank 0's)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return fn()
    result, failed = None, None
    if dist.get_rank() == 0:
        try:
            result = fn()
        except Exception as e:
            failed = e
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    flag = torch.tensor([float(failed is not None)], device=device)
    dist.all_reduce(flag)  # (gloo or nccl: every rank passes here once rank 0 is done)
    if failed is not None:
        raise failed
    if flag.item():
        raise UserError("rank 0 could not prepare the data (its error is above)")
    return result if dist.get_rank() == 0 else fn()
