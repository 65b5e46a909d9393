"""Writing and checking the files of a checkpoint (or of an exported model directory).

Every file megalm writes for a model goes through here, so three promises hold everywhere:

- a full disk is reported as "no space left on device writing PATH" (torch's own message for it is
  `unexpected pos 4202496 vs 4202384`), and the partial file is removed;
- files get the permissions of the process's umask, like any other file (safetensors' `save_file`
  creates them 0600, which makes a shared export unreadable by the rest of a team);
- each file's checksum (xxHash3, 64 bits, one of the fastest non-cryptographic hashes; its cost
  is measured by tools/bench/checkpoint.py) can be recorded at save and verified at load, which
  catches flipped bytes that leave the size unchanged.
"""

from __future__ import annotations

import errno
import os
import pickle
import shutil
from typing import Callable

import torch
import xxhash
from safetensors.torch import save_file

CHECKSUM_ALGORITHM = "xxh3_64"
_CHUNK = 16 << 20  # bytes read at a time when hashing a file


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or used; the message names the file and what to do."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def honour_umask(path: str) -> None:
    """Give `path` the permissions an ordinary `open(path, "w")` would have given it."""
    os.chmod(path, 0o666 & ~_umask())


def _out_of_space(error: BaseException) -> bool:
    """Does `error` (or anything in its chain) say the disk is full? torch wraps the OSError in a
    RuntimeError ("unexpected pos"), safetensors in a SafetensorError ("os error 28")."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if getattr(error, "errno", None) in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(error) or "os error 28" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def write_file(path: str, write: Callable[[object], None], binary: bool = True) -> None:
    """Create `path` with `write(file)`; on failure remove the partial file and raise
    CheckpointError, naming a full disk as such."""
    try:
        with open(path, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException as e:
        if os.path.exists(path):
            os.remove(path)
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        raise write_error(path, e) from e


def write_error(path: str, error: BaseException) -> CheckpointError:
    if _out_of_space(error):
        free = shutil.disk_usage(os.path.dirname(os.path.abspath(path)) or ".").free
        return CheckpointError(f"no space left on device writing {path} ({free / 2**20:.1f} MiB free): free some space "
                               f"(older checkpoints, caches) or save elsewhere with --save; nothing written before "
                               f"this checkpoint was touched")
    return CheckpointError(f"could not write {path}: {type(error).__name__}: {error}")


def save_torch(obj, path: str) -> None:
    """torch.save through our own file object, so a full disk surfaces as an OSError we can name."""
    write_file(path, lambda f: torch.save(obj, f))


def save_safetensors(tensors: dict, path: str, metadata: dict = None) -> None:
    """safetensors' save_file, with the umask's permissions and a clear full-disk error."""
    try:
        save_file(tensors, path, metadata=metadata)
    except Exception as e:
        if os.path.exists(path):
            os.remove(path)
        raise write_error(path, e) from e
    honour_umask(path)


def load_torch(path: str):
    """torch.load of tensors and plain containers only (weights_only): a file holding any other
    pickled object is refused by name, as unpickling it could run code."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path} holds pickled objects other than tensors and plain containers; megalm never "
                              f"loads those (unpickling can run code). Convert it to safetensors with the tool that "
                              f"wrote it, or restore the file from a trusted source") from e
    except Exception as e:  # torch raises several types for a damaged archive
        raise CheckpointError(f"{path} is corrupt ({type(e).__name__}: {e})") from e


def write_text_atomic(path: str, text: str) -> None:
    """Write `path` through a temporary file and a rename: readers see the old or the new text."""
    tmp = f"{path}.tmp.{os.getpid()}"
    write_file(tmp, lambda f: f.write(text), binary=False)
    os.replace(tmp, path)


def checksum(path: str) -> str:
    """The file's xxHash3-64 as 16 hex digits."""
    h = xxhash.xxh3_64()
    buffer = bytearray(min(_CHUNK, max(os.path.getsize(path), 1)))  # reused: a fresh block per read page-faults
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(buffer)
            if not n:
                return h.hexdigest()
            h.update(view[:n])
