"""Scratch external data: where replaced weights of a large model wait, memory-mapped, until save.

A pass that prunes a weight of a model loaded with external data hands the new array to
:meth:`onnxprune.ir.model.Model.set_array`; instead of copying it into the proto (which makes the
process hold the whole pruned model until :func:`onnxprune.ir.save.save`), the bytes are appended
to one scratch file and the initializer becomes a memory-mapped :class:`ExternalRef` into it. The
array is then freed by the caller and the kernel keeps the bytes in the page cache (clean, evictable
pages once written back), so the resident set stays near a few of the largest tensors whatever the
model size. ``save`` streams them from the map into the output's external data.

The scratch file lives in a private hidden folder ``.onnxprune-scratch-<pid>-<random>``: beside the
output when the CLI runs (:func:`scratch_near`; that folder must hold the output anyway, and a
RAM-backed ``/tmp`` would put the weights back in memory), else under ``ONNXPRUNE_SCRATCH_DIR`` or
``TMPDIR``. It is created with mode 0700, removed when the last model that uses it
is garbage collected, at interpreter exit, and on error paths alike (``weakref.finalize``). A run
killed with SIGKILL cannot clean up; the next :class:`Scratch` created removes folders whose
``<pid>`` is no longer a live process.

Offsets are multiples of :data:`ALIGN` (4 KiB: ONNX Runtime maps page-aligned external data instead of reading it). The file only grows: a
weight replaced twice leaves its first bytes unused until the folder is removed.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import shutil
import tempfile
import weakref
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from onnxprune.ir.tensors import ExternalRef

#: Folder name prefix of scratch folders (the owning process id follows).
PREFIX = ".onnxprune-scratch-"

#: Environment variable naming the folder scratch folders are made in (default: TMPDIR).
ENV_DIR = "ONNXPRUNE_SCRATCH_DIR"

#: Offsets of spilled tensors are multiples of this.
ALIGN = 4096


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale(parent: Path) -> list[Path]:
    """Remove scratch folders in ``parent`` left by processes that no longer run; return them."""
    removed = []
    with contextlib.suppress(OSError):
        for entry in parent.iterdir():
            name = entry.name[1:] if entry.name.startswith(".") else entry.name  # also the first, unhidden name
            if not name.startswith(PREFIX[1:]) or not entry.is_dir():
                continue
            pid = name[len(PREFIX) - 1:].split("-", 1)[0]
            if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry)
    return removed


_NEAR: contextvars.ContextVar[Path | None] = contextvars.ContextVar("scratch_near", default=None)


@contextlib.contextmanager
def scratch_near(folder: str | os.PathLike[str]) -> Iterator[None]:
    """Within the block, new scratch folders go in ``folder`` (unless ``ONNXPRUNE_SCRATCH_DIR`` is set)."""
    token = _NEAR.set(Path(folder))
    try:
        yield
    finally:
        _NEAR.reset(token)


def scratch_parent() -> Path:
    """The folder scratch folders go in: ``$ONNXPRUNE_SCRATCH_DIR``, the :func:`scratch_near` folder, or TMPDIR."""
    return Path(os.environ.get(ENV_DIR) or _NEAR.get() or tempfile.gettempdir())


class Scratch:
    """One append-only scratch data file in a private temporary folder.

    Args:
        parent: Folder to create the private folder in (default :func:`scratch_parent`).
    """

    def __init__(self, parent: str | os.PathLike[str] | None = None) -> None:
        base = Path(parent) if parent is not None else scratch_parent()
        remove_stale(base)
        self.folder = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-", dir=base))
        self.path = self.folder / "weights.data"
        self._file = open(self.path, "wb")  # noqa: SIM115 - closed by close() / the finalizer
        self._offset = 0
        self._finalizer = weakref.finalize(self, _cleanup, self._file, self.folder)

    @property
    def size(self) -> int:
        """Bytes written so far."""
        return self._offset

    @property
    def closed(self) -> bool:
        """True once the folder has been removed."""
        return not self._finalizer.alive

    def write(self, arr: np.ndarray) -> ExternalRef:
        """Append ``arr``'s bytes (C order) and return where they are."""
        if self.closed:
            raise ValueError("scratch file already removed")
        pad = (-self._offset) % ALIGN
        if pad:
            self._file.write(b"\0" * pad)
            self._offset += pad
        buf = np.ascontiguousarray(arr)
        self._file.write(memoryview(buf.reshape(-1).view(np.uint8)))
        self._file.flush()  # readers map the file: the bytes must be in it, not in our buffer
        ref = ExternalRef(self.path, self._offset, buf.nbytes, scratch=True)
        self._offset += buf.nbytes
        return ref

    def close(self) -> None:
        """Remove the folder and its file now (memory maps into it stay readable until dropped)."""
        self._finalizer()


def _cleanup(f: object, folder: Path) -> None:
    with contextlib.suppress(OSError):
        f.close()  # type: ignore[attr-defined]
    shutil.rmtree(folder, ignore_errors=True)
