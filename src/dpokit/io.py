"""Files that appear whole or not at all: write beside the target, fsync, rename into place (a rename
is atomic on POSIX), with the permissions `open()` would have given under the umask."""

import json
import os
import tempfile
from pathlib import Path


def umask_mode() -> int:
    """0o777 without the process umask's bits (read without changing it for good)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o777 & ~mask


def set_modes(path: Path):
    """A directory tree (or one file) as mkdir / open() would create it under the umask: mkdtemp makes
    0700 and mkstemp and safetensors 0600, which would leave outputs unreadable to the group that reads
    the rest."""
    mode = umask_mode()
    path = Path(path)
    if path.is_file():
        os.chmod(path, mode & 0o666)
        return
    for root, _, names in os.walk(path):
        os.chmod(root, mode)
        for name in names:
            os.chmod(os.path.join(root, name), mode & 0o666)


def fsync_file(path: Path):
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def atomic_write(path, write):
    """write(tmp_path) fills a temporary file beside `path`; it is fsynced and renamed to `path`. On any
    failure the temporary file goes and `path` is as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        set_modes(Path(tmp))
        fsync_file(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path, text: str):
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_jsonl_atomic(path, rows):
    """One JSON object per line (UTF-8 kept as is), atomically."""
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
