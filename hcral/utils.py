"""Small helpers shared across the package: atomic writes, seeding, the CPU allocator."""

from __future__ import annotations

import ctypes
import json
import os
import sys
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch


# mkstemp creates files owner-only; results are ordinary files.
_FILE_MODE = 0o644
# Temporary files of an atomic write are ".<name>.<random>.tmp" beside their target.
_TMP_PREFIX, _TMP_SUFFIX = ".", ".tmp"


def _atomic_replace(path: str | Path, write: Any) -> Path:
    """Write through a temporary file in the same folder, fsync, then rename: readers never see
    half a file, and a crash leaves the old file intact. Parent folders are created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f"{_TMP_PREFIX}{path.name}.", suffix=_TMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def remove_stale_temp_files(folder: str | Path) -> list[Path]:
    """Delete the temporary files that atomic writes in ``folder`` left behind when the process was
    killed between creating and renaming them; returns their paths. Call it only while no other
    process writes into ``folder``."""
    stale = [p for p in Path(folder).glob(f"{_TMP_PREFIX}*{_TMP_SUFFIX}") if p.is_file()]
    for p in stale:
        p.unlink()
    return stale


def write_text_atomic(path: str | Path, text: str) -> Path:
    return _atomic_replace(path, lambda f: f.write(text.encode()))


def write_json_atomic(path: str | Path, obj: Any, *, indent: int | None = None) -> Path:
    return write_text_atomic(path, json.dumps(obj, indent=indent))


def torch_save_atomic(obj: Any, path: str | Path) -> None:
    _atomic_replace(path, lambda f: torch.save(obj, f))


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
