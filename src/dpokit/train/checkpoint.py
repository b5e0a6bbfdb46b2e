"""Checkpoints that survive a kill at any moment, notice damage, and resume exactly.

A checkpoint `output_dir/checkpoint-<step>/` holds everything the run needs to continue as if
nothing had happened:
  model.safetensors (+ config, tokenizer)  the weights, a directory `from_pretrained` loads
  optimizer.pt                             optimizer state (tensors only; loaded with weights_only=True)
  rng_state.pt                             torch CPU (and CUDA) generator states
  trainer_state.json                       step, data position, scheduler, python/numpy RNG, the
                                           unfinished logging window, and the resolved config
  manifest.json                            size and sha256 of every other file, written last
It is written into a temporary sibling directory, fsynced, and renamed into place: a rename is atomic,
so a kill leaves either the previous checkpoint or the new one, never a broken one. Leftover
temporary directories are swept away on the next start. Damage after the fact (a truncated or
edited file, a bit flip, a file copied in from another run) fails the manifest: `resume=auto` then
falls back to the newest checkpoint that verifies, saying which one it skipped and why.
Checkpoints written before manifests existed are accepted with a warning (their files cannot be
verified, only parsed); one whose trainer_state says it had a manifest but has none is damaged.
"""

import hashlib
import json
import logging
import os
import random
import shutil
import signal
import tempfile
from pathlib import Path

import numpy as np
import torch

from dpokit.config import to_dict
from dpokit.errors import UserError
from dpokit.io import set_modes

log = logging.getLogger("dpokit")

PREFIX = "checkpoint-"
STATE = "trainer_state.json"
MANIFEST = "manifest.json"
WEIGHT_FILES = ("model*.safetensors", "model.safetensors.index.json", "adapter_model*.safetensors")
FORMAT = 2  # trainer_state["checkpoint_format"]: 2 = has a manifest (format 1, before it, has no such key)


def fault_point(name: str):
    """Fault injection for the kill tests: DPOKIT_KILL_AT=<name> SIGKILLs this process right here."""
    if os.environ.get("DPOKIT_KILL_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


def _fsync_dir(path: Path, files=True):
    """fsync every file below `path` (when `files`), then the directory entries themselves."""
    for root, _, names in os.walk(path) if files else [(path, [], [])]:
        for name in names:
            with open(os.path.join(root, name), "rb") as fh:
                os.fsync(fh.fileno())
        fd = os.open(root, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _reason(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {"python": _listify(random.getstate()), "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]}


def _listify(x):
    return [_listify(v) for v in x] if isinstance(x, (tuple, list)) else x


def _tuplify(x):
    return tuple(_tuplify(v) for v in x) if isinstance(x, list) else x


def set_rng_state(state: dict, torch_states: dict):
    random.setstate(_tuplify(state["python"]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch_states["cpu"])
    if torch.cuda.is_available() and "cuda" in torch_states:
        torch.cuda.set_rng_state_all(list(torch_states["cuda"]))


def save_checkpoint(out_dir: Path, step: int, save_model, optimizer, trainer_state: dict, limit=None) -> Path:
    """Write checkpoint-<step> atomically; keep the newest `limit` checkpoints.

    Any failure of any writer (OSError, but also RuntimeError / SafetensorError from a full disk)
    removes the partial directory and becomes one UserError; the previous checkpoint stays."""
    out_dir = Path(out_dir)
    final = out_dir / f"{PREFIX}{step}"
    tmp = None
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{PREFIX}{step}.", suffix=".tmp", dir=out_dir))
        save_model(tmp)
        fault_point(f"save:{step}")
        if optimizer is not None:  # (None: save_model wrote it, sharded, with the model: train/parallel.py)
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
        torch.save({"cpu": torch.get_rng_state(), **({"cuda": cuda} if cuda else {})}, tmp / "rng_state.pt")
        state = {**trainer_state, "step": step, "rng": rng_state(), "checkpoint_format": FORMAT}
        (tmp / STATE).write_text(json.dumps(state))
        write_manifest(tmp)  # last: it vouches for every file written before it
        set_modes(tmp)
        _fsync_dir(tmp)
        _replace_dir(tmp, final)
        _fsync_dir(out_dir, files=False)
    except BaseException as e:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, UserError) or not isinstance(e, Exception):  # (a second signal: exit at once)
            raise
        raise UserError(f"{final}: cannot write checkpoint ({_reason(e)}); the previous checkpoint is intact") from None
    if limit:
        for old in list_checkpoints(out_dir)[:-limit]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _replace_dir(src: Path, dst: Path):
    """Rename src to dst; an existing dst (the same step saved before) is first renamed aside, so
    that at every moment dst is either the old directory or the new one, never half of either."""
    if dst.exists():
        aside = dst.with_name(f".{dst.name}.{os.getpid()}.old.tmp")
        os.rename(dst, aside)
        os.rename(src, dst)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.rename(src, dst)


def save_final(out_dir: Path, save_model, last_checkpoint=None):
    """The final model into out_dir itself: written to a temporary sibling, then each file renamed
    into place, so a failure (a full disk) leaves no half-written model.safetensors. Returns what
    save_model returns."""
    out_dir = Path(out_dir)
    tmp = None
    try:
        tmp = Path(tempfile.mkdtemp(prefix=".final.", suffix=".tmp", dir=out_dir))
        result = save_model(tmp)
        fault_point("save:final")
        set_modes(tmp)
        _fsync_dir(tmp)
        new = {p.name for p in tmp.iterdir()}
        for pattern in WEIGHT_FILES:  # an earlier model's other shards (save_pretrained removes them too)
            for old in out_dir.glob(pattern):
                if old.name not in new and old.is_file():
                    old.unlink()
        for p in sorted(tmp.iterdir()):
            target = out_dir / p.name
            if p.is_dir() and target.is_dir():
                shutil.rmtree(target)
            os.replace(p, target)
        _fsync_dir(out_dir, files=False)
    except BaseException as e:
        if isinstance(e, UserError) or not isinstance(e, Exception):
            raise
        raise UserError(
            f"{out_dir}: cannot write the final model ({_reason(e)}); the last checkpoint "
            f"{last_checkpoint or '(none)'} is intact: run again with resume=auto"
        ) from None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return result


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _files(directory: Path) -> list:
    """Every regular file below `directory`, as sorted relative posix paths."""
    return sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file())


def write_manifest(directory: Path):
    files = {
        rel: {"size": (directory / rel).stat().st_size, "sha256": _sha256(directory / rel)}
        for rel in _files(directory)
        if rel != MANIFEST
    }
    with open(directory / MANIFEST, "w", encoding="utf-8") as f:
        json.dump({"files": files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def verify(path) -> str | None:
    """None when the checkpoint at `path` is whole; otherwise `FILE: what is wrong` (one line).

    With a manifest: every listed file exists with its size and sha256, and no other file is there.
    Without one (older dpokit): trainer_state.json parses and the safetensors headers cover their
    files. Either way the step in trainer_state.json matches the directory's name."""
    path = Path(path)
    if not path.is_dir():
        return f"{path}: not a checkpoint directory"
    manifest = None
    if (path / MANIFEST).exists():
        try:
            manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))["files"]
            sizes = {rel: int(meta["size"]) for rel, meta in manifest.items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            return f"{path / MANIFEST}: unreadable ({_reason(e)})"
        for rel, size in sizes.items():
            f = path / rel
            if not f.is_file():
                return f"{f}: missing (listed in {MANIFEST})"
            if f.stat().st_size != size:
                return f"{f}: {f.stat().st_size} bytes, {MANIFEST} says {size} (truncated or replaced)"
        extra = sorted(set(_files(path)) - set(manifest) - {MANIFEST})
        if extra:
            return f"{path / extra[0]}: not in {MANIFEST} (a file added after the save)"
        for rel, meta in manifest.items():
            if _sha256(path / rel) != meta.get("sha256"):
                return f"{path / rel}: contents differ from the sha256 in {MANIFEST} (changed after the save)"
    try:
        state = json.loads((path / STATE).read_text(encoding="utf-8"))
        step = state["step"] if isinstance(state, dict) else None
    except FileNotFoundError:
        return f"{path / STATE}: missing"
    except (OSError, ValueError, KeyError) as e:
        return f"{path / STATE}: unreadable ({_reason(e)})"
    if not isinstance(step, int):
        return f"{path / STATE}: no step"
    name = path.name[len(PREFIX) :]
    if path.name.startswith(PREFIX) and name.isdigit() and int(name) != step:
        return f"{path / STATE}: says step {step}, the directory is {path.name}"
    if manifest is None:
        if state.get("checkpoint_format", 1) >= 2:
            return f"{path / MANIFEST}: missing"
        return _verify_unlisted(path)
    return None


def _verify_unlisted(path: Path) -> str | None:
    """The checks a checkpoint without a manifest allows: the files exist and safetensors parse."""
    from safetensors import safe_open

    weights = sorted(path.glob("model*.safetensors")) + sorted(path.glob("adapter_model.safetensors"))
    if not weights:
        return f"{path}: no model*.safetensors"
    for name in ("optimizer.pt", "rng_state.pt"):
        if not (path / name).is_file():
            return f"{path / name}: missing"
    for f in weights:
        try:
            with safe_open(f, "pt") as fh:
                fh.keys()
        except Exception as e:  # noqa: BLE001 (SafetensorError, not an OSError, for a truncated file)
            return f"{f}: unreadable ({_reason(e)})"
    return None


def list_checkpoints(out_dir) -> list:
    """Checkpoint directories, oldest first (one exists only once renamed into place; verify() says
    whether it was damaged since)."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    found = []
    for p in out_dir.iterdir():
        if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX) :].isdigit():
            found.append((int(p.name[len(PREFIX) :]), p))
    return [p for _, p in sorted(found)]


def sweep_temporary(out_dir):
    out_dir = Path(out_dir)
    if out_dir.is_dir():
        for pattern in (f".{PREFIX}*.tmp", ".final.*.tmp"):
            for p in out_dir.glob(pattern):
                shutil.rmtree(p, ignore_errors=True)


def find_resume(resume, out_dir):
    """`auto`: the newest checkpoint in out_dir that verifies, or None when there is none at all;
    a path: that checkpoint, which must verify. Damaged checkpoints are skipped with a warning."""
    if not resume:
        return None
    if resume == "auto":
        found, damaged = list_checkpoints(out_dir), []
        for path in reversed(found):
            problem = verify(path)
            if problem is None:
                _warn_unverified(path)
                return path
            log.warning("%s: damaged, not resuming from it: %s", path.name, problem)
            damaged.append(problem)
        if damaged:
            raise UserError(
                f"{out_dir}: no checkpoint to resume from is intact ({'; '.join(damaged)}); "
                "move them away to start afresh"
            )
        return None
    path = Path(resume)
    problem = verify(path)
    if problem is not None:
        raise UserError(f"{problem}; cannot resume from {path}")
    _warn_unverified(path)
    return path


def _warn_unverified(path):
    if not (Path(path) / MANIFEST).exists():
        log.warning("%s: written by an older dpokit without %s: its files cannot be verified", path, MANIFEST)


def load_checkpoint(path: Path, model, optimizer, load_weights=None) -> dict:
    """Restore weights, optimizer and RNG states; return the trainer state. Any failure to read the
    files (one that verify() could not foresee, e.g. an older checkpoint without a manifest) is one
    UserError naming the checkpoint. load_weights(path), when given, restores weights and optimizer
    itself (a sharded DCP checkpoint: train/parallel.py)."""
    path = Path(path)
    try:
        if load_weights is not None:
            load_weights(path)
            return _load_trainer_state(path)
        return _load(path, model, optimizer)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 (SafetensorError, UnpicklingError, RuntimeError...: its files')
        raise UserError(f"{path}: cannot load checkpoint ({type(e).__name__}: {_reason(e)})") from None


def _load(path: Path, model, optimizer) -> dict:
    from safetensors.torch import load_file

    if (path / "adapter_model.safetensors").is_file():  # a LoRA run: only the adapters are trained
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, load_file(path / "adapter_model.safetensors"))
        if result.unexpected_keys:
            raise UserError(f"{path}: adapter does not match the model (unexpected {result.unexpected_keys[:3]})")
        return _load_rest(path, optimizer)
    weights = {}
    for f in sorted(path.glob("model*.safetensors")):  # model.safetensors or its shards, nothing else
        weights.update(load_file(f))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    if isinstance(getattr(model, "_tied_weights_keys", None), dict):
        tied = set(model._tied_weights_keys)
    if unexpected or [k for k in missing if k not in tied]:
        raise UserError(
            f"{path}: checkpoint does not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    if missing and hasattr(model, "tie_weights"):
        model.tie_weights()
    return _load_rest(path, optimizer)


def _load_rest(path, optimizer) -> dict:
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    return _load_trainer_state(path)


def _load_trainer_state(path) -> dict:
    state = json.loads((path / STATE).read_text())
    set_rng_state(state["rng"], torch.load(path / "rng_state.pt", weights_only=True))
    return state


# keys that may differ between a run and its resumption without changing the result
RESUME_FREE_KEYS = {
    "resume",
    "progress_bar",
    "logging_steps",
    "eval_steps",
    "save_steps",
    "save_total_limit",
    "max_nonfinite_steps",
    "output_dir",
    "per_device_eval_batch_size",
    "max_eval_examples",
    "dataset_num_proc",  # (how the data is tokenized, not which ids: the same either way)
    "cache_tokenized",
}


# how the run is spread over processes: a checkpoint of any of them resumes in any other
PARALLEL_KEYS = {"parallelism", "fsdp_cpu_offload", "fsdp_reshard_after_forward"}
BATCH_KEYS = ("per_device_train_batch_size", "gradient_accumulation_steps")


def check_resumable(cfg, state, path, world: int = 1):
    """The config must be the checkpoint's, up to RESUME_FREE_KEYS and PARALLEL_KEYS. With another number
    of processes (`world`), the batch keys may change as long as the global batch, per-device batch x
    accumulation x processes, does not: train/order.py then hands out the same examples per step."""
    saved = state.get("config", {})
    free = RESUME_FREE_KEYS | PARALLEL_KEYS
    saved_world = state.get("world")
    if saved_world is not None and all(k in saved for k in BATCH_KEYS):
        now = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * world
        then = saved["per_device_train_batch_size"] * saved["gradient_accumulation_steps"] * saved_world
        if now != then:
            raise UserError(
                f"{path}: cannot resume: the global batch (per_device_train_batch_size x "
                f"gradient_accumulation_steps x processes) is {now}, the checkpoint's is {then} "
                f"({saved['per_device_train_batch_size']} x {saved['gradient_accumulation_steps']} x {saved_world})"
            )
        if world != saved_world:
            free = free | set(BATCH_KEYS)
    diff = [k for k, v in to_dict(cfg).items() if k not in free and k in saved and saved[k] != v]
    if diff:
        raise UserError(
            f"{path}: cannot resume: the config differs in {', '.join(diff)} "
            f"(checkpoint has {', '.join(f'{k}={saved[k]!r}' for k in diff)})"
        )
