"""Where run files live: a local directory or a bucket (``gs://``), through ``etils.epath`` —
whole-file writes, appended records, moving a tree aside, and the lock that keeps one training
process per run directory.

Guarantees, and where an object store gives a weaker one (docs/outputs.md "Runs in a bucket"):

- ``atomic``: a file is written whole or not at all. Locally: a temporary file beside it
  (mode 0666 less the umask, so 0644 by default), fsynced, renamed over the final name. In a
  bucket: the bytes are gathered in memory and written as one object, which the store makes
  visible whole or not at all; nothing is written when the block fails.
- ``append_line``: locally one fsynced ``write`` in append mode (a kill leaves at most a half
  line, dropped by readers). In a bucket an object cannot be appended to: the file is read and
  written again whole (one object write per record).
- ``lock``: locally an fcntl lock on RUN_DIR/.lock (released by the kernel when the process
  dies) and the file removed at exit. In a bucket (``gs://``) a lock object, written with the
  precondition "no such object yet" (``if_generation_match=0``), refreshed by its holder every
  ``LEASE_S / 4`` seconds and deleted at exit. A lock object older than ``LEASE_S``, or naming a
  process of this host that has ended (its holder was killed without the chance to remove it),
  is taken over under the precondition that it is still the one read. Weaker than fcntl: a
  holder on another host is judged gone by the age of its lock object against this machine's
  clock, so a run whose holder stalls for ``LEASE_S`` can be taken over.
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import secrets
import socket
import threading
import time
import warnings

from etils import epath

LEASE_S = 120.0  # a bucket lock object not refreshed for this long belongs to a run that is gone


class RunDirError(ValueError):
    """A run directory (or a file in it) is missing, unreadable or not what was expected."""


class RunWarning(UserWarning):
    """Something in a run the user should know of that does not stop it (a checkpoint moved aside,
    a diverged member, a refused float16); the command line prints it as one line."""


def warn(message: str) -> None:
    warnings.warn(message, RunWarning, stacklevel=3)


def is_local(p) -> bool:
    """Whether ``p`` names a local path (not ``gs://``, ``s3://``, ...)."""
    return "://" not in os.fspath(p)


def _installed(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False


def path(p) -> epath.Path:
    """``p`` (a str, pathlib.Path or epath.Path) as an ``epath.Path``.

    Raises RunDirError: a bucket path whose file system library is not installed."""
    text = os.fspath(p)
    if text.startswith("gs://"):
        if not (_installed("google.cloud.storage") and (_installed("gcsfs") or _installed("tensorflow"))):
            raise RunDirError(f"{text}: run directories in a bucket need gcsfs: pip install 'jaxconcept[gcs]'")
    elif not is_local(text):
        raise RunDirError(f"{text}: allowed run directories are local paths and gs:// buckets")
    return epath.Path(text)


# --------------------------------------------------------------------------------------------
# Writing whole files
# --------------------------------------------------------------------------------------------
def _fsync_dir(directory) -> None:
    with contextlib.suppress(OSError):  # not every file system lets a directory be opened
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic(target, mode: str = "w"):
    """A file object whose contents replace ``target`` whole when the block ends without an
    error; on an error nothing is written. ``mode``: "w" (text) or "wb"."""
    target = path(target)
    if not is_local(target):
        buf = io.StringIO() if "b" not in mode else io.BytesIO()
        yield buf
        data = buf.getvalue()
        target.write_bytes(data.encode() if isinstance(data, str) else data)
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    # O_EXCL with mode 0666: the umask applies, as to any file the user writes (mkstemp's is 0600)
    tmp = target.parent / f".{target.name}.{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def append_line(target, line: str) -> None:
    """Append one line (ending in a newline) to ``target``: see the module docstring."""
    target = path(target)
    if is_local(target):
        with open(target, "a") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        return
    old = target.read_bytes() if target.exists() else b""
    if old and not old.endswith(b"\n"):
        old += b"\n"
    target.write_bytes(old + line.encode())


def move_tree(src, dst) -> None:
    """Move the directory ``src`` to ``dst`` (whose parent is created). In a bucket, where a
    directory is a name prefix, every object is copied and then the originals removed."""
    src, dst = path(src), path(dst)
    if is_local(src):
        dst.parent.mkdir(parents=True, exist_ok=True)
        src.rename(dst)
        return

    def copy(s, d):
        for child in s.iterdir():
            if child.is_dir():
                copy(child, d / child.name)
            else:
                child.copy(d / child.name, overwrite=True)
    copy(src, dst)
    src.rmtree()


# --------------------------------------------------------------------------------------------
# The lock
# --------------------------------------------------------------------------------------------
def _holder() -> str:
    return f"pid {os.getpid()} on {socket.gethostname()}"


def _gone(holder: str) -> bool:
    """Whether ``holder`` ("pid N on HOST") is a process of this host that no longer runs."""
    m = re.fullmatch(r"pid (\d+) on (\S+)", holder.strip())
    if not m or m.group(2) != socket.gethostname():
        return False
    try:
        os.kill(int(m.group(1)), 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


def _in_use(run_dir, holder: str, extra: str = "") -> RunDirError:
    return RunDirError(f"{run_dir} is in use by {holder or 'another process'}{extra}; wait for it to finish, or "
                       "stop it, before training into this directory again")


@contextlib.contextmanager
def lock(run_dir):
    """Hold the lock of ``run_dir`` for the duration (one training process per run): see the
    module docstring. Raises RunDirError naming the holder."""
    run_dir = path(run_dir)
    with (_file_lock if is_local(run_dir) else _bucket_lock)(run_dir):
        yield


@contextlib.contextmanager
def _file_lock(run_dir):
    import fcntl

    p = run_dir / ".lock"
    while True:
        fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
            os.close(fd)
            raise _in_use(run_dir, holder) from None
        # a holder that was finishing may have removed the file between our open and our lock:
        # then we hold an inode nobody else can find, so take the lock again on the current file
        try:
            mine, now = os.fstat(fd), os.stat(p)
            if (mine.st_dev, mine.st_ino) == (now.st_dev, now.st_ino):
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{_holder()}\n".encode(), 0)
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(p)  # before the lock is released: a process waiting on this inode then starts again
        os.close(fd)


@contextlib.contextmanager
def _bucket_lock(run_dir):
    from google.api_core import exceptions as gexc
    from google.auth.exceptions import GoogleAuthError
    from google.cloud import storage

    if not os.fspath(run_dir).startswith("gs://"):
        raise RunDirError(f"{run_dir}: a run directory in a bucket must be gs://")
    bucket, _, prefix = os.fspath(run_dir)[len("gs://"):].partition("/")
    try:
        client = storage.Client()
    except GoogleAuthError as exc:
        raise RunDirError(f"{run_dir}: no Google Cloud credentials ({exc})") from None
    blob = client.bucket(bucket).blob(f"{prefix.rstrip('/')}/.lock".lstrip("/"))
    body = f"{_holder()}\n"
    try:
        old = client.bucket(bucket).get_blob(blob.name)
        if old is not None:
            holder = old.download_as_text(if_generation_match=old.generation).strip()
            age = time.time() - old.updated.timestamp()
            if age < LEASE_S and not _gone(holder):
                raise _in_use(run_dir, holder, f" (its lock refreshed {age:.0f} s ago)")
        # created only if absent, or replacing only the dead run's lock just read
        blob.upload_from_string(body, if_generation_match=0 if old is None else old.generation)
    except gexc.PreconditionFailed:
        raise _in_use(run_dir, "another process that started at the same time") from None
    except gexc.NotFound:
        raise RunDirError(f"{run_dir}: the bucket {bucket} does not exist") from None
    except gexc.GoogleAPIError as exc:
        raise RunDirError(f"{run_dir}: cannot take the run lock ({type(exc).__name__}: {exc})") from None
    stop, state = threading.Event(), {"generation": blob.generation}

    def refresh():
        while not stop.wait(LEASE_S / 4):
            try:
                blob.upload_from_string(body, if_generation_match=state["generation"])
                state["generation"] = blob.generation
            except gexc.PreconditionFailed:
                warn(f"{run_dir}/.lock was taken over by another process; it no longer protects this run")
                return
            except Exception:  # noqa: BLE001 - a failed refresh is tried again at the next one
                continue
    thread = threading.Thread(target=refresh, name="jaxconcept-lock", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        with contextlib.suppress(gexc.GoogleAPIError):
            blob.delete(if_generation_match=state["generation"])
