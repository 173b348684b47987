"""The files of a training run directory, each written atomically (a temporary file in the same
folder, flushed and fsynced, then os.replace), so a crash never leaves half a file behind.

    RUN_DIR/checkpoint.pt   the latest checkpoint (CHECKPOINT_FORMAT, see save_checkpoint)
    RUN_DIR/results.json    config, per-step metrics, few-shot results, status
    RUN_DIR/curves.png      training curves (matplotlib, Agg canvas)
    RUN_DIR/.bmssl-lock     held (flock) by the one `bmssl train` writing the directory
"""
from __future__ import annotations

import codecs
import json
import math
import os
import tempfile
from pathlib import Path

import torch

CHECKPOINT_NAME = "checkpoint.pt"
RESULTS_NAME = "results.json"
CURVES_NAME = "curves.png"
LOCK_NAME = ".bmssl-lock"
RUN_FILES = (CHECKPOINT_NAME, RESULTS_NAME, CURVES_NAME)
CHECKPOINT_FORMAT = "bmssl-checkpoint"
CHECKPOINT_VERSION = 1
CHECKPOINT_KEYS = ("format", "version", "step", "learner", "generator", "config", "history", "data")


def atomic_write(path, write) -> Path:
    """Call write(file object, binary) on a temporary file beside `path`, then move it over
    `path` in one os.replace. Returns the path."""
    path = Path(path)
    temporary = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.chmod(temporary, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
        with os.fdopen(descriptor, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException as error:
        if temporary is not None:
            Path(temporary).unlink(missing_ok=True)
        if isinstance(error, OSError) and str(path) not in str(error):  # "[Errno 28] No space left" said no file
            message = f"cannot write {path}: {error.strerror or error}"
            raise (OSError(error.errno, message) if error.errno is not None else OSError(message)) from error
        raise
    return path


class RunLock:
    """An exclusive flock on RUN_DIR/.bmssl-lock for as long as a run writes the directory, so that
    a second `bmssl train` with the same --out (or a second --resume of the run) is refused at
    once: before, both ran to the end, their checkpoints alternated and one run was lost. The
    file holds the owner's pid for the message; it stays when the lock is released, except in a
    directory the lock made and nothing else wrote (a run that failed before its first checkpoint
    leaves no empty directory). Where flock is unavailable, nothing is locked."""

    def __init__(self, run_dir, what: str = "--out"):
        self.path = Path(run_dir) / LOCK_NAME
        self.what = what
        self.handle = None
        self.made_directory = False

    def __enter__(self) -> "RunLock":
        try:
            import fcntl
        except ImportError:  # not POSIX
            return self
        self.made_directory = not self.path.parent.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            owner = handle.read().strip() or "unknown"
            handle.close()
            self.made_directory = False
            raise ValueError(f"{self.what} {self.path.parent} is in use by another bmssl train (pid {owner}); "
                             "wait for it to end, or choose another --out") from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        self.handle = handle
        return self

    def __exit__(self, *_exc) -> None:
        if self.handle is None:
            return
        if self.made_directory and [p.name for p in self.path.parent.iterdir()] == [LOCK_NAME]:
            self.path.unlink(missing_ok=True)  # while still locked
            self.path.parent.rmdir()
        self.handle.close()  # releases the flock
        self.handle = None


def writable_directory(path, what: str) -> Path:
    """Check, before any long work whose results go to the directory `path`, that it can be
    made (if missing) and written, without creating anything: a ValueError naming `what` (the
    flag, e.g. "--out") and the reason otherwise."""
    path = Path(path).expanduser()
    existing = path
    while not existing.exists() and existing != existing.parent:
        if existing.is_symlink():  # a dangling link
            break
        existing = existing.parent
    if not existing.is_dir():
        kind = "is a file" if existing == path else f"lies under the file {existing}"
        raise ValueError(f"{what} {path} {kind}, not a directory")
    try:  # a probe file, removed at once (os.access would say yes to root on a read-only mount)
        descriptor, probe = tempfile.mkstemp(dir=existing, prefix=".bmssl-write-test.")
        os.close(descriptor)
        os.unlink(probe)
    except OSError as error:
        where = "" if existing == path else f" (in {existing})"
        raise ValueError(f"{what} {path}: cannot write there{where}: {error.strerror or error}") from None
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _json_safe(value):
    """NaN and ±inf become None (strict JSON has no spelling for them); tuples become lists."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(key): _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    return value


def write_json(path, payload) -> Path:
    text = json.dumps(_json_safe(payload), indent=1, allow_nan=False) + "\n"
    return atomic_write(path, lambda handle: handle.write(text.encode()))


# ---- checkpoints ------------------------------------------------------------------------------


def checkpoint_path(path) -> Path:
    """RUN_DIR -> RUN_DIR/checkpoint.pt; a file path is returned as is."""
    path = Path(path).expanduser()
    return path / CHECKPOINT_NAME if path.is_dir() else path


def save_checkpoint(path, *, step: int, learner_state: dict, generator_state: torch.Tensor, config: dict,
                    history: list, data: dict, extra: dict | None = None) -> Path:
    """Write a checkpoint: {"format", "version", "step", "learner" (MetaLearner.state_dict()),
    "generator" (the task-sampling torch.Generator state), "config" (the TrainConfig as a dict),
    "history" (per-step metrics), "data" (what was trained on, with a fingerprint), **extra}."""
    state = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "step": int(step),
             "learner": learner_state, "generator": generator_state.cpu(), "config": dict(config),
             "history": list(history), "data": dict(data), **(extra or {})}
    return atomic_write(path, lambda handle: torch.save(state, handle))


def load_checkpoint(path, resuming: bool = False) -> dict:
    """Read and check a checkpoint written by save_checkpoint (RUN_DIR or a file).
    FileNotFoundError when it is missing; ValueError when it is corrupt, truncated or not a
    bmssl checkpoint (never a raw unpickling traceback). `resuming`: the error advises what
    --resume can do instead."""
    given = Path(path).expanduser()
    file = checkpoint_path(given)
    if not file.is_file():
        where = (f"{given} holds no {CHECKPOINT_NAME}" if given.is_dir() else f"no such file {file}")
        raise FileNotFoundError(f"checkpoint not found: {where}; pass a run directory written by "
                                f"`bmssl train --out RUN_DIR` or the path of its {CHECKPOINT_NAME}")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as error:  # torch.load raises RuntimeError, EOFError, UnpicklingError, ...
        kind = _other_kind_of_file(file)
        if kind is not None:
            beside = file.parent / CHECKPOINT_NAME
            hint = f"; the checkpoint beside it is {beside}" if beside.is_file() and beside != file else ""
            raise ValueError(f"{file} is not a bmssl checkpoint: it is {kind}, not a torch.save archive{hint}. "
                             f"Pass a run directory written by `bmssl train --out RUN_DIR` or the path of its "
                             f"{CHECKPOINT_NAME}") from None
        advice = (". Resume from an intact checkpoint, or start a new run with another --out" if resuming else "")
        raise ValueError(f"cannot read checkpoint {file}: it is corrupt or truncated ({type(error).__name__}: "
                         f"{_load_error_reason(error)[:200]}){advice}") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{file} is not a bmssl training checkpoint (no format={CHECKPOINT_FORMAT!r} "
                         "entry); checkpoints come from `bmssl train`")
    if state.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"{file} is a version {state.get('version')} checkpoint; this bmssl reads "
                         f"version {CHECKPOINT_VERSION}")
    missing = [key for key in CHECKPOINT_KEYS if key not in state]
    if missing:
        raise ValueError(f"checkpoint {file} lacks {', '.join(missing)}: it is damaged")
    state["path"] = str(file)
    return state


def _load_error_reason(error: Exception) -> str:
    """The cause in torch.load's message, without its weights_only advice."""
    text = str(error).strip()
    marker = "WeightsUnpickler error:"
    if marker in text:
        text = text.split(marker, 1)[1].strip()
    return text.splitlines()[0] if text else type(error).__name__


def _other_kind_of_file(file: Path):
    """What `file` is when its first bytes show it is no torch.save file ("JSON text", "text",
    "a PNG image"), else None (an archive or pickle, damaged, or bytes that say nothing)."""
    with open(file, "rb") as handle:
        head = handle.read(4096)
    if head.startswith(b"\x89PNG"):
        return "a PNG image"
    if not head or head.startswith(b"PK") or head[:1] == b"\x80" or b"\x00" in head:
        return None
    try:
        text = codecs.getincrementaldecoder("utf-8")().decode(head)  # a cut last character is fine
    except UnicodeDecodeError:
        return None
    return "JSON text" if text.lstrip()[:1] in ("{", "[") else "text"


# ---- curves -----------------------------------------------------------------------------------

CURVES = (("outer_loss", "outer loss", False), ("inner_loss_start", "support loss at w_0", False),
          ("inner_loss", "support loss at w_L", False), ("query_accuracy", "query accuracy of w_L", False),
          ("grad_norm", "meta-gradient norm", True), ("lr", "outer learning rate", False))


def _smooth(values, weight=0.9):
    """Exponential moving average, bias-corrected from the first value."""
    smoothed, average = [], 0.0
    for index, value in enumerate(values, 1):
        average = weight * average + (1 - weight) * value
        smoothed.append(average / (1 - weight**index))
    return smoothed


def plot_curves(path, history: list, title: str = "") -> Path:
    """Training curves from the per-step metrics, one panel per metric in CURVES (raw and
    smoothed); metrics a method does not report show "n/a"."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(12, 6.5))
    FigureCanvasAgg(figure)
    axes = figure.subplots(2, 3).flatten()
    figure.subplots_adjust(left=0.06, right=0.98, bottom=0.08, top=0.9, hspace=0.4, wspace=0.25)
    for axis, (key, label, log_scale) in zip(axes, CURVES):
        points = [(row["step"], row[key]) for row in history
                  if isinstance(row.get(key), (int, float)) and math.isfinite(row[key])]
        axis.set_title(label, fontsize=10)
        axis.set_xlabel("step")
        if not points:
            axis.text(0.5, 0.5, "n/a", ha="center", va="center", transform=axis.transAxes)
            continue
        steps, values = zip(*points)
        axis.plot(steps, values, color="tab:blue", alpha=0.35 if len(points) > 20 else 1.0, linewidth=1)
        if len(points) > 20 and key != "lr":
            axis.plot(steps, _smooth(values), color="tab:blue", linewidth=1.8)
        if log_scale and min(values) > 0:
            axis.set_yscale("log")
        axis.grid(alpha=0.3)
    if title:
        figure.suptitle(title, fontsize=11)

    def write(handle):
        figure.savefig(handle, format="png", dpi=100)

    return atomic_write(path, write)
