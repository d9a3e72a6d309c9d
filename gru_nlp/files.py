"""Write a file so that a reader, or a crash, never sees half of it."""

from __future__ import annotations

import contextlib
import os
import re
import stat
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO


@contextlib.contextmanager
def atomic_write(path: Path, binary: bool = False, sync: bool = False) -> Iterator[IO]:
    """Open a temporary file beside `path`; when the block ends without error, rename it to `path`.

    The rename within one folder is atomic: `path` holds its old content or the new, never part
    of it, and on an error (or Ctrl-C) the old content stays and the temporary file is removed.
    The file gets the permissions `path` has, or else those `open` would give a new file
    (`tempfile.mkstemp` makes it readable by its owner only). `sync` flushes it to disk
    before the rename, so that a power cut cannot leave an empty file under the name.

    As with `open`, a symbolic link is written through (its target gets the new content), and a
    `path` that is not a regular file (a named pipe, ``/dev/null``) is written to directly:
    renaming over it would replace the device or pipe with a file. ``/dev/stdout``, ``/dev/stderr``
    and ``/dev/fd/N`` are written through the stream they name, where it stands, even when it was
    redirected to a file.
    """
    path = Path(path)
    mode, encoding = ("wb", {}) if binary else ("w", {"encoding": "utf-8"})
    descriptor = _stream_descriptor(path)
    if descriptor is not None:  # write through the open stream (sharing its position), never reopen its file
        sys.stdout.flush()
        with os.fdopen(os.dup(descriptor), mode, **encoding) as file:
            yield file
        return
    if _is_special(path):
        with open(path, mode, **encoding) as file:
            yield file
        return
    path = Path(os.path.realpath(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as error:  # named after the file asked for, not the temporary one
        raise OSError(error.errno, f"cannot write {path}: {error.strerror}") from None
    try:
        os.chmod(tmp, _permissions_for(path))
        with os.fdopen(fd, mode, **encoding) as file:
            yield file
            if sync:
                file.flush()
                os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _stream_descriptor(path: Path) -> int | None:
    """The file descriptor that ``/dev/stdout``, ``/dev/stderr`` or ``/dev/fd/N`` names, if `path` is one."""
    match = re.fullmatch(r"/dev/(stdout|stderr)|/(?:dev|proc/self)/fd/(\d+)", str(path))
    if match is None:
        return None
    return {"stdout": 1, "stderr": 2}[match[1]] if match[1] else int(match[2])


def _is_special(path: Path) -> bool:
    """Whether `path` exists (following links) and is something other than a regular file."""
    try:
        return not stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def _permissions_for(path: Path) -> int:
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except OSError:  # no file there yet: 0o666 less the umask, as open() gives
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask
