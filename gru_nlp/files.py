"""Write a file so that a reader, or a crash, never sees half of it."""

from __future__ import annotations

import contextlib
import os
import stat
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
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, _permissions_for(path))
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as file:
            yield file
            if sync:
                file.flush()
                os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _permissions_for(path: Path) -> int:
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except OSError:  # no file there yet: 0o666 less the umask, as open() gives
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask
