"""Files pykernels writes get the mode any program's files get: ``0o666 & ~umask``.

safetensors writes through a private temporary file (mode 0600) and renames
it, so a model saved by ``pk.save`` would otherwise be readable by its owner
only, unlike the charts and JSON written beside it.
"""

from __future__ import annotations

import os
import threading

_lock = threading.Lock()


def umask() -> int:
    """The process's umask, read without changing it where the OS allows."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    # Elsewhere the only way is to set it and put it back; the lock keeps our own
    # threads from seeing the temporary value.
    with _lock:
        mask = os.umask(0o077)
        os.umask(mask)
    return mask


def follow_umask(path: str | os.PathLike) -> None:
    """Sets a regular file we just wrote to ``0o666 & ~umask``."""
    os.chmod(path, 0o666 & ~umask())
