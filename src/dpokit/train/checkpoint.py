"""Checkpoints that survive a kill at any moment, and exact resume.

A checkpoint `output_dir/checkpoint-<step>/` holds everything the run needs to continue as if
nothing had happened:
  model.safetensors (+ config, tokenizer)  the weights, a directory `from_pretrained` loads
  optimizer.pt                             optimizer state (tensors only; loaded with weights_only=True)
  rng_state.pt                             torch CPU (and CUDA) generator states
  trainer_state.json                       step, data position, scheduler, python/numpy RNG, the
                                           unfinished logging window, and the resolved config
It is written into a temporary sibling directory, fsynced, and renamed into place: a rename is atomic,
so a kill leaves either the previous checkpoint or the new one, never a broken one. Leftover
temporary directories are swept away on the next start.
"""

import json
import os
import random
import shutil
import signal
import tempfile
from pathlib import Path

import numpy as np
import torch

from dpokit.errors import UserError

PREFIX = "checkpoint-"
STATE = "trainer_state.json"


def fault_point(name: str):
    """Fault injection for the kill tests: DPOKIT_KILL_AT=<name> SIGKILLs this process right here."""
    if os.environ.get("DPOKIT_KILL_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


def _fsync_dir(path: Path):
    for f in path.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {"python": _listify(random.getstate()),
            "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]}


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
    """Write checkpoint-<step> atomically; keep the newest `limit` checkpoints."""
    out_dir = Path(out_dir)
    final = out_dir / f"{PREFIX}{step}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{PREFIX}{step}.", suffix=".tmp", dir=out_dir))
    try:
        save_model(tmp)
        fault_point(f"save:{step}")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
        torch.save({"cpu": torch.get_rng_state(), **({"cuda": cuda} if cuda else {})}, tmp / "rng_state.pt")
        state = {**trainer_state, "step": step, "rng": rng_state()}
        (tmp / STATE).write_text(json.dumps(state))
        _fsync_dir(tmp)
        if final.exists():  # the same step saved before (e.g. resumed exactly here): replace it
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(out_dir)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"{final}: cannot write checkpoint ({e.strerror or e}); the previous checkpoint "
                        "is intact") from None
    if limit:
        for old in list_checkpoints(out_dir)[:-limit]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(out_dir) -> list:
    """Complete checkpoints, oldest first (a checkpoint exists only once renamed into place)."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    found = []
    for p in out_dir.iterdir():
        if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit() and (p / STATE).is_file():
            found.append((int(p.name[len(PREFIX):]), p))
    return [p for _, p in sorted(found)]


def sweep_temporary(out_dir):
    out_dir = Path(out_dir)
    if out_dir.is_dir():
        for p in out_dir.glob(f".{PREFIX}*.tmp"):
            shutil.rmtree(p, ignore_errors=True)


def find_resume(resume, out_dir):
    """`auto`: the newest complete checkpoint in out_dir, or None; a path: that checkpoint."""
    if not resume:
        return None
    if resume == "auto":
        found = list_checkpoints(out_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / STATE).is_file():
        raise UserError(f"{path}: not a complete checkpoint (no {STATE})")
    return path


def load_checkpoint(path: Path, model, optimizer) -> dict:
    """Restore weights, optimizer and RNG states; return the trainer state."""
    from safetensors.torch import load_file

    path = Path(path)
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
        raise UserError(f"{path}: checkpoint does not match the model (missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]})")
    if missing and hasattr(model, "tie_weights"):
        model.tie_weights()
    return _load_rest(path, optimizer)


def _load_rest(path, optimizer) -> dict:
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    state = json.loads((path / STATE).read_text())
    set_rng_state(state["rng"], torch.load(path / "rng_state.pt", weights_only=True))
    return state
