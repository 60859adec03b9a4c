"""Atomic writes: nothing half-written is left behind. Each writer fills a temporary file beside the target and
renames it over the target only when the write succeeded; a failed write removes the temporary file.

The standard library only, nothing of the package (tests/integration/test_import_graph.py): training, serving
(the MMS workers' reports to serve's watchdog) and the host tools all write through it.
"""

from __future__ import annotations

import json
import os
import secrets
import stat
from contextlib import contextmanager
from pathlib import Path


def _create_beside(path: Path) -> Path:
    """A new empty file with a random name beside `path`, created as open() creates files (mode 0666 less the
    umask: 0644 usually). A 0600 file renamed into place is one a non-root reader cannot open (a model directory
    that SageMaker tars into model.tar.gz, read by a serving container's user)."""
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return tmp
    raise FileExistsError(f"no free temporary name beside {path}")


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary name beside `path`; rename it over `path` only if the block succeeds. The file gets the
    permissions a plain open() would give it (umask), whatever the writer did: mkstemp and safetensors (0.8)
    make 0600 files."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _create_beside(path)
    mode = stat.S_IMODE(tmp.stat().st_mode)  # 0666 less the umask, without changing the process's umask
    try:
        yield tmp
        os.chmod(tmp, mode)  # a writer may have replaced the file with a 0600 one of its own
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json(path: str | os.PathLike, data) -> None:
    write_text(path, json.dumps(data, indent=2) + "\n")
