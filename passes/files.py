"""Writing output files whole or not at all: a temporary file beside the target, then a rename."""
from __future__ import annotations

import os
import tempfile

from .errors import InputError


def temp_beside(path: str, overwrite: bool = False, suffix: str = ".tmp") -> str:
    """A new empty temporary file in ``path``'s directory, after the checks a user error can fail."""
    if os.path.exists(path) and not overwrite:
        raise InputError(f"output file '{path}' exists (use --force / overwrite=True to replace it)")
    if os.path.isdir(path):
        raise InputError(f"output path '{path}' is a directory")
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise InputError(f"cannot write '{path}': directory '{directory}' does not exist")
    try:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".pathfx-", suffix=suffix)
    except OSError as e:
        raise InputError(f"cannot write '{path}': directory '{directory}' is not writable ({e.strerror})") from None
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it owner-only; the renamed file gets a plain file's mode
    return tmp


def write_atomic(path: str, data, force: bool = False, binary: bool = False) -> None:
    """Write ``data`` (text, bytes, or a callable given the open file) to ``path`` atomically."""
    tmp = temp_beside(path, overwrite=force)
    try:
        with open(tmp, "wb" if binary else "w") as f:
            if callable(data):
                data(f)
            else:
                f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
