"""One writer per output_dir: an exclusive lock held for the whole training run.

Two runs writing into one output_dir would delete each other's checkpoints and interleave their
metric rows. The run holds `output_dir/.dpokit.lock`, a file naming its owner (pid, host, start time),
locked with `fcntl.flock` on an open descriptor: the kernel drops the lock when the process dies,
however it dies, so a SIGKILLed run never blocks the next one. A lock file left by a dead run is
taken over with a warning that names it. Where the filesystem cannot flock (some network mounts),
the pid in the file decides: a live pid on this host, or any pid on another host, holds it.

Under torchrun only rank 0 takes the lock (the ranks share one output_dir by design).
"""

import errno
import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path

from dpokit.errors import UserError

log = logging.getLogger("dpokit")

LOCK_NAME = ".dpokit.lock"


def _owner_text(owner: dict) -> str:
    if not owner:
        return "another dpokit run (owner unknown)"
    return (
        f"another dpokit run (pid {owner.get('pid', '?')} on host {owner.get('host', '?')}, "
        f"started {owner.get('started', '?')})"
    )


def _read_owner(path: Path) -> dict:
    try:
        owner = json.loads(path.read_text(encoding="utf-8"))
        return owner if isinstance(owner, dict) else {}
    except (OSError, ValueError):
        return {}


def _pid_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, TypeError, OverflowError):
        return True  # someone else's live process, or a pid we cannot judge: assume it runs
    return True


def _busy_error(out_dir, owner: dict) -> UserError:
    return UserError(
        f"{out_dir}: output_dir is in use by {_owner_text(owner)}; wait for it to finish or choose another output_dir"
    )


def check_free(out_dir):
    """Fail early, writing nothing, when another live run holds out_dir (a cheap check before loading)."""
    path = Path(out_dir) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # no lock file (or no output_dir yet): free
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise _busy_error(out_dir, _read_owner(path)) from None
    except OSError:
        return  # cannot flock here: RunLock.acquire decides by pid
    finally:
        os.close(fd)


class RunLock:
    """`with RunLock(out_dir):` holds output_dir for this process; release() unlinks the lock file."""

    def __init__(self, out_dir):
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / LOCK_NAME
        self.fd = None

    def acquire(self):
        self.out_dir.mkdir(parents=True, exist_ok=True)
        for _ in range(10):  # the file may be unlinked and recreated between open and flock: retry
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise _busy_error(self.out_dir, _read_owner(self.path)) from None
            except OSError as e:
                try:
                    if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                        raise
                    self._check_by_pid()  # no flock on this filesystem
                except BaseException:
                    os.close(fd)
                    raise
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self.fd = fd
                break
            os.close(fd)
        else:
            raise UserError(f"{self.path}: cannot take the output_dir lock (the file keeps changing)")
        previous = _read_owner(self.path)
        if previous and previous.get("pid") != os.getpid():
            log.warning(
                "%s: taking over a stale lock of pid %s on host %s (started %s), which is no longer running",
                self.path,
                previous.get("pid", "?"),
                previous.get("host", "?"),
                previous.get("started", "?"),
            )
        owner = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, (json.dumps(owner) + "\n").encode(), 0)
        os.fsync(self.fd)
        return self

    def _check_by_pid(self):
        owner = _read_owner(self.path)
        if not owner or owner.get("pid") == os.getpid():
            return
        if owner.get("host") != socket.gethostname() or _pid_alive(owner.get("pid")):
            raise _busy_error(self.out_dir, owner)

    def release(self):
        if self.fd is None:
            return
        try:
            self.path.unlink()  # before unlocking: a waiting run then finds no file, or a fresh one
        except FileNotFoundError:
            pass
        finally:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_UN)
            except OSError:
                pass
            os.close(self.fd)
            self.fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
