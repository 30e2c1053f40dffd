"""Small helpers shared across the package: atomic writes, seeding, the CPU allocator."""

from __future__ import annotations

import ctypes
import errno
import io
import json
import os
import random
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch


# mkstemp creates files owner-only; results are ordinary files.
_FILE_MODE = 0o644
# Temporary files of an atomic write are ".<name>.<random>.tmp" beside their target.
_TMP_PREFIX, _TMP_SUFFIX = ".", ".tmp"


class WriteError(OSError):
    """A file could not be written: names the file and the reason; for a full disk also how much
    space is free there and how much the file needs. ``errno`` is the underlying one."""


def _size(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB" if n >= 2**20 else f"{n:,} bytes"


def _free_bytes(folder: Path) -> int | None:
    """Free space for an unprivileged writer in ``folder`` or its nearest existing parent."""
    for candidate in (folder, *folder.parents):
        if candidate.exists():
            try:
                return shutil.disk_usage(candidate).free
            except OSError:
                return None
    return None


def write_error(path: str | Path, e: OSError | None, *, needed: int | None = None, note: str = "") -> WriteError:
    """The :class:`WriteError` for a failed write of ``path`` (``e``: what the write raised; None
    when a check found too little space before writing). ``note`` is added, e.g. what survived."""
    path = Path(path)
    free = _free_bytes(path.parent)
    full = e is None or e.errno in (errno.ENOSPC, errno.EDQUOT)
    if full:
        reason = "no space left on the device"
        if free is not None:
            reason += f" ({_size(free)} free in {path.parent}"
            reason += f", the file needs {_size(needed)})" if needed is not None else ")"
    else:
        reason = e.strerror or str(e)
    error = WriteError(f"cannot write {path}: {reason}" + (f"; {note}" if note else ""))
    error.errno = errno.ENOSPC if e is None else e.errno
    return error


def _atomic_replace(path: str | Path, data: bytes | memoryview) -> Path:
    """Write ``data`` through a temporary file in the same folder, fsync, then rename: readers never
    see half a file, and a failed write (a full disk, a kill) leaves the old file intact. Parent
    folders are created. The data is whole before the first byte is written, so its size is known:
    too little free space fails before anything is touched, and a failure names the file."""
    path = Path(path)
    kept = f"the previous {path.name} is intact" if path.exists() else ""
    free = _free_bytes(path.parent)
    if free is not None and len(data) > free:
        raise write_error(path, None, needed=len(data), note=kept)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f"{_TMP_PREFIX}{path.name}.", suffix=_TMP_SUFFIX, dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            _write_all(f, data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError) and not isinstance(e, WriteError):
            raise write_error(path, e, needed=len(data), note=kept) from e
        raise
    return path


def _write_all(f: Any, data: bytes | memoryview) -> None:
    f.write(data)


def remove_stale_temp_files(folder: str | Path) -> list[Path]:
    """Delete the temporary files that atomic writes in ``folder`` left behind when the process was
    killed between creating and renaming them; returns their paths. Call it only while no other
    process writes into ``folder``."""
    stale = [p for p in Path(folder).glob(f"{_TMP_PREFIX}*{_TMP_SUFFIX}") if p.is_file()]
    for p in stale:
        p.unlink()
    return stale


def write_bytes_atomic(path: str | Path, data: bytes | memoryview) -> Path:
    return _atomic_replace(path, data)


def write_text_atomic(path: str | Path, text: str) -> Path:
    return _atomic_replace(path, text.encode())


def write_json_atomic(path: str | Path, obj: Any, *, indent: int | None = None) -> Path:
    return write_text_atomic(path, json.dumps(obj, indent=indent))


def torch_save_atomic(obj: Any, path: str | Path) -> None:
    # Serialised in memory first (one copy of the checkpoint's bytes): its size is then known before
    # the disk is touched, and a full disk is an OSError naming the file, not torch's "[enforce fail
    # at inline_container.cc] unexpected pos".
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    _atomic_replace(path, buffer.getbuffer())


def append_text(path: str | Path, text: str) -> None:
    """Append ``text`` to ``path`` (a log); a failed write names the file and the reason."""
    try:
        with open(path, "a") as f:
            f.write(text)
    except OSError as e:
        raise write_error(path, e, needed=len(text.encode())) from e


def add_note(e: BaseException, note: str) -> None:
    """``e.add_note(note)``, also on Python 3.10 (where the CLI still reads ``__notes__``)."""
    if hasattr(e, "add_note"):
        e.add_note(note)
    else:
        e.__notes__ = [*getattr(e, "__notes__", []), note]  # type: ignore[attr-defined]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Every RNG a training run draws from, for an exact resume."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
# Allocations up to this size come from malloc's heap, and freed memory up to it stays there.
KEEP_FREED_BYTES = 1 << 30


def keep_freed_memory(threshold: int = KEEP_FREED_BYTES) -> bool:
    """Let glibc's malloc reuse freed memory instead of returning it to the OS.

    By default glibc serves every large tensor from a fresh ``mmap`` and unmaps it when freed, so
    each CPU training step page-faults its activations in again: on the Aquarium configs a third of
    a step was kernel time (docs/results.md, section 8). Raising the mmap and trim thresholds keeps
    that memory in the heap, so the process holds its peak memory until it exits. Returns whether
    glibc took the setting (False off Linux or with another C library).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, threshold)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, threshold))
    except (OSError, AttributeError):  # no glibc (e.g. musl): leave the allocator as it is
        return False
