"""Local copies of remote (S3) input files for the decode tasks, shared on a node by the time ranges of a long file.

Decoders need a local path, so a decode task copies an S3 object to local disk first. A long file cut into time
ranges (`range_seconds`) is many decode tasks; each copying the whole object would fetch it once per range (a 2 h
film at 300 s ranges: 24 downloads). Instead the copy goes into a per-node cache directory, and the ranges that run
on that node use the one copy:

- the first task takes the entry's lock exclusively and downloads (to a unique `.part` name, renamed into place);
  the others block on the same lock, then find the copy complete;
- a task holds the entry's lock *shared* for as long as it decodes, so an entry in use is never evicted;
- the cache is bounded by `source_cache_bytes`: before a download, the least recently used entries that no task
  holds are deleted until the new one fits (a file larger than the bound is not cached: a private temporary copy,
  deleted after its task, as for a file that is one task).

Locks are `flock`s on per-entry lock files, which the kernel releases when a task dies, so a killed task leaves
no lock behind, and its half-written `.part` is deleted by the next task that takes that entry or evicts it.
The lock files (empty) are kept: deleting one while another task waits on it would let two tasks download.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import tempfile
import time
import uuid
from collections.abc import Iterator

import pyarrow.fs as pafs

from lumiere import storage
from lumiere.storage import StorageOptions

_BLOCK = 8 * 2**20


def default_cache_dir() -> str:
    return os.path.join(tempfile.gettempdir(), "lumiere-source-cache")


@contextlib.contextmanager
def local_source(uri: str, options: StorageOptions, shared: bool, cache_dir: str | None = None,
                 max_bytes: int = 0) -> Iterator[tuple[str, int]]:
    """A local path for `uri` while the block runs: yields (path, bytes this call fetched from remote storage).

    Local files are used in place (0 bytes fetched). A remote file is copied: with `shared` (its task is one of
    several time ranges of the file) and a bound `max_bytes` > 0, through the node's cache in `cache_dir`
    (module docstring), else to a private temporary file deleted when the block ends."""
    if not storage.is_s3(uri):
        yield str(uri), 0
        return
    fs, path = storage.resolve(uri, options)
    info = fs.get_file_info(path)
    if info.type != pafs.FileType.File:
        raise FileNotFoundError(f"{uri} does not exist")
    if not shared or max_bytes <= 0 or info.size > max_bytes:
        fd, tmp = tempfile.mkstemp(suffix=os.path.splitext(uri)[1])
        os.close(fd)
        try:
            _download(fs, path, tmp)
            yield tmp, info.size
        finally:
            os.unlink(tmp)
        return
    cache_dir = cache_dir or default_cache_dir()
    os.makedirs(cache_dir, exist_ok=True)
    # the object's identity: a replaced object (another size or modification time) is another entry
    key = hashlib.sha1(f"{uri}\0{info.size}\0{info.mtime_ns}".encode()).hexdigest()[:24]
    data = os.path.join(cache_dir, key + os.path.splitext(uri)[1])
    lock = os.open(os.path.join(cache_dir, key + ".lock"), os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fetched = 0
        fcntl.flock(lock, fcntl.LOCK_SH)
        while not _complete(data, info.size):  # (checked again once held shared: see below)
            # released, then taken exclusively (two tasks converting a shared lock at once would deadlock)
            fcntl.flock(lock, fcntl.LOCK_UN)
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not _complete(data, info.size):  # another task may have downloaded it while this one waited
                _remove_parts(cache_dir, key)  # a killed task's half-written copy
                _evict(cache_dir, info.size, max_bytes, key)
                part = f"{data}.part-{uuid.uuid4().hex[:8]}"
                try:
                    _download(fs, path, part)
                    os.replace(part, data)
                except BaseException:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(part)
                    raise
                fetched += info.size
            # exclusive -> shared in place (a downgrade never waits); the loop's check covers a kernel that
            # releases first and an evictor that took the entry in between
            fcntl.flock(lock, fcntl.LOCK_SH)
        # recency, for eviction: an explicit nanosecond time, since utime(None) stamps the kernel's coarse clock
        # (a tick of 4-10 ms), which ties two uses of the cache in quick succession and evicts the wrong one
        now = time.time_ns()
        os.utime(data, ns=(now, now))
        yield data, fetched
    finally:
        os.close(lock)  # releases the lock


def _download(fs: pafs.FileSystem, path: str, dest: str) -> None:
    # streamed to disk in blocks: memory stays at one block whatever the object's size
    with open(dest, "wb") as f, fs.open_input_stream(path) as src:
        while block := src.read(_BLOCK):
            f.write(block)


def _complete(data: str, size: int) -> bool:
    try:
        return os.path.getsize(data) == size
    except FileNotFoundError:
        return False


def _remove_parts(cache_dir: str, key: str) -> None:
    for name in os.listdir(cache_dir):
        if name.startswith(key) and ".part-" in name:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(cache_dir, name))


def _entries(cache_dir: str) -> list[tuple[int, int, str, list[str]]]:
    """(last use, bytes, key, file names) of every entry's files but its lock file."""
    by_key: dict[str, list] = {}
    for entry in os.scandir(cache_dir):
        if entry.name.endswith(".lock"):
            continue
        key = entry.name[:24]
        try:
            st = entry.stat()
        except FileNotFoundError:
            continue
        used, size, names = by_key.get(key, (0, 0, []))
        by_key[key] = (max(used, st.st_mtime_ns), size + st.st_size, [*names, entry.name])
    return sorted((used, size, key, names) for key, (used, size, names) in by_key.items())


def _evict(cache_dir: str, incoming: int, max_bytes: int, keep: str) -> None:
    """Delete the least recently used entries no task holds until `incoming` more bytes fit in `max_bytes`. An
    entry in use (its lock held, shared or exclusive) is skipped, so the bound is exceeded rather than a running
    task's file deleted."""
    entries = _entries(cache_dir)
    used = sum(size for _, size, _, _ in entries)
    for _, size, key, names in entries:
        if used + incoming <= max_bytes:
            return
        if key == keep:
            continue
        fd = os.open(os.path.join(cache_dir, key + ".lock"), os.O_CREAT | os.O_RDWR, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # in use
            for name in names:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(cache_dir, name))
            used -= size
        finally:
            os.close(fd)
