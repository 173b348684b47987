"""The on-disk cache for rendered / decoded datasets.

Files live in $BMSSL_CACHE_DIR, else ~/.cache/bmssl. Each is one .npz named by a key, the hash of
everything that determines its content. Writes are atomic (temp file in the same folder, then
os.replace), so a crash never leaves a half-written file under the final name. A file that is
unreadable, has the wrong key or fails its checksum is reported with a warning and treated as
missing: the caller renders again and overwrites it.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np

ENV_VAR = "BMSSL_CACHE_DIR"


def cache_dir() -> Path:
    """The cache folder: $BMSSL_CACHE_DIR, else ~/.cache/bmssl (not created here)."""
    configured = os.environ.get(ENV_VAR)
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "bmssl"


def cache_key(description) -> str:
    """Hex sha256 of `description` (any JSON-serialisable value), keys sorted."""
    text = json.dumps(description, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _checksum(arrays: dict) -> str:
    digest = hashlib.sha256()
    for name in sorted(arrays):
        array = np.ascontiguousarray(arrays[name])
        digest.update(f"{name}:{array.dtype.str}:{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def save_arrays(path: Path, arrays: dict, key: str, meta: dict | None = None) -> bool:
    """Write `arrays` (name -> numpy array, no object dtypes) and `meta` (JSON) to `path`,
    atomically. Returns True on success; on an OS error (read-only folder, full disk) warns and
    returns False."""
    path = Path(path)
    header = {"key": key, "checksum": _checksum(arrays), "meta": meta or {}}
    temp_name = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=path.name + ".", suffix=".tmp",
                                         delete=False) as handle:
            temp_name = handle.name
            np.savez_compressed(handle, __header__=np.array(json.dumps(header)), **arrays)
            handle.flush()
            os.fsync(handle.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temp_name, 0o666 & ~umask)  # NamedTemporaryFile makes it private (0600)
        os.replace(temp_name, path)
        return True
    except OSError as error:
        warnings.warn(f"bmssl: could not write the cache file {path} ({error}); continuing "
                      f"without it. Set {ENV_VAR} to a writable folder to cache.", stacklevel=3)
        return False
    finally:
        if temp_name is not None and os.path.exists(temp_name):
            os.unlink(temp_name)


def load_arrays(path: Path, key: str):
    """Read a file written by save_arrays. Returns (arrays dict, meta dict), or None when the file
    is missing; a corrupt or stale file (bad zip, wrong key, checksum mismatch) warns and also
    returns None."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as archive:
            header = json.loads(str(archive["__header__"]))
            arrays = {name: archive[name] for name in archive.files if name != "__header__"}
        if header.get("key") != key:
            problem = "it was written for a different key"
        elif header.get("checksum") != _checksum(arrays):
            problem = "its checksum does not match its content"
        else:
            return arrays, header.get("meta", {})
    except Exception as error:  # any failure to read means "rebuild", never a crash
        problem = f"it cannot be read ({type(error).__name__}: {error})"
    warnings.warn(f"bmssl: ignoring the cache file {path}: {problem}; it will be rebuilt.",
                  stacklevel=3)
    return None
