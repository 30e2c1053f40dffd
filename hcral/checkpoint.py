"""Checkpoints and run folders: what a checkpoint must hold, which settings may change when it is
reused, and how earlier results are kept from being overwritten.

A checkpoint written by ``hcral train`` holds the model, optimiser, scheduler and RNG states, the
data position, the resolved config (``config``) and the classes (``class_names``, ``cat_ids``).
Reusing it:

- **resume** (``hcral train --resume``): the config must equal the stored one except for the
  :data:`RESUME_FREE` keys (where and how fast the run goes, what and how often it logs, saves
  and evaluates, and the iteration budget); anything else is an error naming the keys.
- **eval and predict**: every setting comes from the checkpoint except the :data:`INFERENCE_FREE`
  keys (output folder, detection thresholds, evaluation batch size, device, and which data is
  read). A config file given with the checkpoint only supplies those; a ``--set`` of any other key
  to another value is an error naming the keys. The loss's state is not loaded (it only matters
  for training).

Run folders: ``train`` refuses a folder that already holds a run unless it resumes; a resume cuts
``log.jsonl`` back to the checkpoint's iteration (the replayed iterations are logged again) and
deletes temporary files a killed write left behind. ``eval`` writes into a folder of its own.
"""

from __future__ import annotations

import copy
import fnmatch
import json
import tempfile
from pathlib import Path
from typing import Any

import torch

from hcral.config import (
    Config,
    ConfigError,
    apply_overrides,
    config_differences,
    config_from_dict,
    load_config,
    validate,
)
from hcral.utils import remove_stale_temp_files, write_text_atomic

CHECKPOINT = "checkpoint.pt"
LOG = "log.jsonl"
RUN_CONFIG = "config.yaml"
METRICS = "metrics.json"
# Files that make a folder a run: training into it again would overwrite or mix them.
RUN_FILES = (CHECKPOINT, LOG, METRICS)
# Default evaluation folder, beside the checkpoint: eval, eval2, eval3, ...
EVAL_DIR = "eval"

# Keys that do not change what training computes (the sample order and augmentation do not depend
# on the number of loader workers, and periodic evaluation does not touch the training state), or,
# like the device, only its rounding (train.amp, train.cpu_amp, train.channels_last: a resume that changes the
# precision says so).
RESUME_FREE = (
    "out_dir", "train.max_iters", "train.device", "train.amp", "train.cpu_amp", "train.amp_float32_stages", "train.channels_last",
    "train.log_interval",
    "train.eval_interval", "train.checkpoint_interval", "train.checkpoint_iters", "train.signal_checkpoint",
    "train.keep_freed_memory", "train.log_grad_share", "data.num_workers", "eval.*",
)  # fmt: skip
# Keys an evaluation or a prediction may set: its output, the detection thresholds and evaluation
# batch size (eval.*), where it runs, and which data it reads. The rest -- model, classes, input
# resolution (data.short_side, data.max_side), losses, schedule -- is the checkpoint's.
INFERENCE_FREE = (
    "out_dir", "eval.*", "train.device", "train.amp", "train.cpu_amp", "train.amp_float32_stages", "train.channels_last",
    "data.num_workers", "data.dataset", "data.root", "data.val_split", "data.val_ann", "data.val_images", "data.synthetic_val", "data.synthetic_size",
    "data.synthetic_seed", "data.holdout_fraction", "data.holdout_seed",
)  # fmt: skip
# Settings that change a model's detections: a config file that differs on them gets a note.
INFERENCE_KEYS = ("model.*", "data.short_side", "data.max_side", "data.class_names", "data.synthetic_classes")
# The loss's moving-average state (GHM-C and HCRA-C bin counts): needed for an exact resume, unused
# by inference.
LOSS_STATE_PREFIX = "head.cls_loss_module."
# How many class names and tensor names an error message lists.
SHOW_AT_MOST = 5


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable, not hcral's, or does not fit the model; names the file."""


class RunFolderError(RuntimeError):
    """A run or output folder cannot be written; names the folder."""


def _matches(key: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(key, p) for p in patterns)


def _describe(diff: dict[str, tuple[Any, Any]], first: str, second: str) -> str:
    return ", ".join(f"{k} ({first} {a!r}, {second} {b!r})" for k, (a, b) in diff.items())


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else type(e).__name__


def _names(names: list[str]) -> str:
    shown = ", ".join(names[:SHOW_AT_MOST])
    return shown + (f", ... ({len(names) - SHOW_AT_MOST} more)" if len(names) > SHOW_AT_MOST else "")


# ---------------------------------------------------------------------------------------------
# Reading a checkpoint
# ---------------------------------------------------------------------------------------------


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint's dict, on the CPU; a :class:`CheckpointError` naming ``path`` if it is
    missing, unreadable or holds no model state."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # a truncated or foreign file: pickle, zip and torch errors alike
        raise CheckpointError(f"{path}: not an hcral checkpoint (torch.load: {_first_line(e)})") from e
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
        raise CheckpointError(f"{path}: not an hcral checkpoint (no 'model' state dict; was it written by 'hcral train'?)")
    return ckpt


def stored_config(ckpt: dict[str, Any], path: str | Path) -> Config:
    """The resolved config the checkpoint was trained with."""
    if not isinstance(ckpt.get("config"), dict):
        raise CheckpointError(f"{path}: holds no config; was it written by 'hcral train'?")
    try:
        return config_from_dict(ckpt["config"])
    except ConfigError as e:
        raise CheckpointError(f"{path}: its stored config no longer loads ({e})") from e


def load_model_state(model: Any, ckpt: dict[str, Any], path: str | Path, *, loss_state: bool) -> None:
    """Load ``ckpt["model"]`` into ``model``, strictly, except that the loss's state
    (:data:`LOSS_STATE_PREFIX`) is skipped unless ``loss_state`` (resume needs it, inference does not).
    Missing, unexpected or reshaped tensors are one :class:`CheckpointError` line, not a dump."""
    state = dict(ckpt["model"])
    own = model.state_dict()
    if not loss_state:
        state = {k: v for k, v in state.items() if not k.startswith(LOSS_STATE_PREFIX)}
        own = {k: v for k, v in own.items() if not k.startswith(LOSS_STATE_PREFIX)}
    problems = []
    reshaped = [k for k in own if k in state and tuple(getattr(state[k], "shape", ())) != tuple(own[k].shape)]
    if reshaped:
        k = reshaped[0]
        problems.append(
            f"{len(reshaped)} tensors of another shape (first {k}: {tuple(state[k].shape)} in the checkpoint, "
            f"{tuple(own[k].shape)} in the model)"
        )
    missing = [k for k in own if k not in state]
    if missing:
        problems.append(f"{len(missing)} missing ({_names(missing)})")
    unexpected = [k for k in state if k not in own]
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected ({_names(unexpected)})")
    if problems:
        raise CheckpointError(f"{path} does not fit the model built from the config: {'; '.join(problems)}")
    model.load_state_dict(state, strict=loss_state)


# ---------------------------------------------------------------------------------------------
# Which settings may change
# ---------------------------------------------------------------------------------------------


def _refuse_differences(
    ckpt: dict[str, Any], cfg: Config, path: str | Path, *, free: tuple[str, ...], given: str, message: str
) -> None:
    """A ConfigError, ``message`` with ``{diff}`` naming them, if settings outside ``free`` differ."""
    diff = {k: v for k, v in config_differences(stored_config(ckpt, path), cfg).items() if not _matches(k, free)}
    if diff:
        raise ConfigError(message.format(diff=_describe(diff, "checkpoint", given)), key=next(iter(diff)))


def check_resume_config(ckpt: dict[str, Any], cfg: Config, path: str | Path) -> None:
    """Resume only with the config the checkpoint was trained with (up to :data:`RESUME_FREE`)."""
    _refuse_differences(
        ckpt, cfg, path, free=RESUME_FREE, given="now",
        message=f"cannot resume {path}: the config differs from the one it was trained with: {{diff}}; "
        f"resume with the run's own {RUN_CONFIG}, or train into a new --out",
    )  # fmt: skip


def check_inference_config(ckpt: dict[str, Any], cfg: Config, path: str | Path) -> None:
    """Evaluate or predict only with the checkpoint's settings (up to :data:`INFERENCE_FREE`)."""
    _refuse_differences(
        ckpt, cfg, path, free=INFERENCE_FREE, given="given",
        message=f"{path} was trained with other settings: {{diff}}; eval and predict take every setting "
        f"but {', '.join(INFERENCE_FREE)} from the checkpoint",
    )  # fmt: skip


def _with_values(cfg: Config, values: dict[str, Any]) -> Config:
    out = copy.deepcopy(cfg)
    for key, value in values.items():
        *parents, leaf = key.split(".")
        obj: Any = out
        for part in parents:
            obj = getattr(obj, part)
        setattr(obj, leaf, copy.deepcopy(value))
    return validate(out)


def inference_config(
    ckpt: dict[str, Any], path: str | Path, config_file: str | Path | None = None, overrides: list[str] | None = None
) -> tuple[Config, list[str]]:
    """The config to evaluate or predict with: the checkpoint's, with the :data:`INFERENCE_FREE`
    keys taken from ``config_file`` (if any) and then ``overrides``.

    Returns (config, notes): the notes name the model-defining keys on which ``config_file`` differs
    from the checkpoint (the checkpoint's values are used) and the data settings it changes (they
    are used). An override that changes any other key is a :class:`ConfigError` naming the keys.
    """
    stored = stored_config(ckpt, path)
    cfg, notes = stored, []
    if config_file is not None:
        diff = config_differences(stored, load_config(config_file))
        taken = {k: v for k, v in diff.items() if _matches(k, INFERENCE_FREE)}
        cfg = _with_values(stored, {k: b for k, (_, b) in taken.items()})
        ignored = {k: v for k, v in diff.items() if _matches(k, INFERENCE_KEYS)}
        if ignored:
            notes.append(
                f"{config_file} differs from the checkpoint on {_describe(ignored, 'checkpoint', 'config')}; "
                f"using the checkpoint's values"
            )
        data = {k: v for k, v in taken.items() if k.startswith("data.") and k != "data.num_workers"}
        if data:
            notes.append(f"reading the data {config_file} names: {_describe(data, 'trained with', 'now')}")
    before = copy.deepcopy(cfg)
    apply_overrides(cfg, list(overrides or []))
    conflicts = {k: v for k, v in config_differences(before, cfg).items() if not _matches(k, INFERENCE_FREE)}
    if conflicts:
        given = ", ".join(f"{k}={b!r}" for k, (_, b) in conflicts.items())
        trained = ", ".join(f"{k}={a!r}" for k, (a, _) in conflicts.items())
        raise ConfigError(
            f"--set {given}: {path} was trained with {trained}; eval and predict take it from the checkpoint "
            f"(settings that may change: {', '.join(INFERENCE_FREE)})",
            key=next(iter(conflicts)),
        )
    return cfg, notes


# ---------------------------------------------------------------------------------------------
# Run folders
# ---------------------------------------------------------------------------------------------


def ensure_writable_dir(folder: str | Path, *, key: str = "out_dir") -> Path:
    """Create ``folder`` (and parents) and check that files can be written in it."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise RunFolderError(f"{key}={folder} is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise RunFolderError(f"{key}={folder} is not a writable folder ({e.strerror or _first_line(e)})") from e
    return folder


def prepare_train_dir(out: str | Path, *, resume: bool, checkpoint_iter: int | None) -> list[Path]:
    """Make ``out`` ready for training; returns the stale temporary files it deleted.

    Without ``resume`` a folder that already holds a run is an error (nothing is touched). With
    ``resume`` the log is cut back to ``checkpoint_iter`` (None: no checkpoint, so the run starts
    over and its log with it).
    """
    out = Path(out)
    if not resume:
        found = [name for name in RUN_FILES if (out / name).exists()]
        if found:
            raise ConfigError(
                f"out_dir={out} already holds a run ({', '.join(found)}); pass --resume to continue it, or "
                "choose another --out (nothing was changed)",
                key="out_dir",
            )
    ensure_writable_dir(out)
    stale = remove_stale_temp_files(out)
    if resume:
        cut_log(out / LOG, checkpoint_iter or 0)
    return stale


def cut_log(path: Path, iteration: int) -> None:
    """Drop the records of ``path`` (JSONL) logged after ``iteration``, and a torn last line: a
    resumed run replays those iterations and logs them again."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines()
    kept = []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a kill
            continue
        if not isinstance(record, dict) or record.get("iter", 0) <= iteration:
            kept.append(line)
    if kept != lines:
        write_text_atomic(path, "".join(f"{line}\n" for line in kept))


def _eval_dir_conflict(out: Path, cfg: Config, checkpoint: Path) -> str | None:
    """Why ``out`` cannot take this evaluation's files (another run's config or checkpoint), or None."""
    if (out / RUN_CONFIG).is_file():
        try:
            diff = config_differences(load_config(out / RUN_CONFIG), cfg)
        except ConfigError:
            diff = {"": None}
        diff.pop("out_dir", None)  # the folder's own name, however it is spelled
        if diff:
            return f"its {RUN_CONFIG} is another run's or evaluation's"
    link = out / CHECKPOINT
    if (link.exists() or link.is_symlink()) and link.resolve() != checkpoint.resolve():
        return f"its {CHECKPOINT} is another checkpoint"
    return None


def eval_dir(checkpoint: str | Path, cfg: Config, out: str | Path | None = None) -> Path:
    """The folder an evaluation writes to: ``out`` if given (an error if it holds another run),
    else the first of ``eval``, ``eval2``, ... beside the checkpoint that is new or holds this same
    evaluation (same config and checkpoint, so only identical results are replaced)."""
    checkpoint = Path(checkpoint)
    if out is not None:
        out = Path(out)
        why = _eval_dir_conflict(out, cfg, checkpoint)
        if why:
            raise ConfigError(f"--out {out}: {why}; choose another --out (nothing was changed)", key="out_dir")
        return out
    base = checkpoint.resolve().parent
    n = 1
    while True:
        candidate = base / (EVAL_DIR if n == 1 else f"{EVAL_DIR}{n}")
        if not _eval_dir_conflict(candidate, cfg, checkpoint):
            return candidate
        n += 1
