"""Small helpers shared across the package: atomic writes and seeding."""

from __future__ import annotations

import json
import os
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
