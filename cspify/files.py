"""Writing files all or nothing: each target is written to a temporary path beside it and
renamed into place only when it is complete, so a failure or a stop leaves no half-written
file and no temporary one.

    with Outputs() as out:                # several targets: all renamed into place, or none
        out.file("m.pt", lambda f: torch.save(gm, f), binary=True)
        out.folder("resnet_csp", lambda d: write_source(gm, d))

    with atomic_file("run.ckpt") as f:    # one file, replacing what is there
        torch.save(state, f)

An OSError while writing is an OutputError with one sentence, and so is a second target
at a path already staged. SIGINT and SIGTERM wait while a temporary path is created or
renamed into place.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Callable
from contextlib import contextmanager

from cspify.errors import OutputError

__all__ = ["Outputs", "atomic_file", "TEMP_PREFIX"]

TEMP_PREFIX = ".cspify-"
HINT = "choose another path"


class Outputs:
    """Targets written to temporary paths beside them, renamed into place on success.

    On any error inside the ``with`` block, a KeyboardInterrupt included (Ctrl-C, or
    SIGTERM as the CLI turns it into one), every temporary path is removed and no target
    is touched; an existing target is replaced only when ``force`` is true. SIGINT and
    SIGTERM wait while a temporary path is created or the targets are renamed, so a stop
    never leaves a temporary path behind or only some targets in place.
    """

    def __init__(self, force: bool = False) -> None:
        self.force = force
        self.staged: list[tuple[str, str]] = []  # (temporary path, target)

    def __enter__(self) -> Outputs:
        return self

    def file(self, path: str, write: Callable, binary: bool = False) -> None:
        """Stage a file: ``write`` gets an open file object."""
        fd, _ = self._temporary(path, ".tmp")
        with _as_output_error(path), os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)

    def path(self, path: str, write: Callable[[str], None], suffix: str = ".tmp") -> None:
        """Stage a file for writers that want a path (``write`` gets the temporary path)."""
        fd, tmp = self._temporary(path, suffix)
        os.close(fd)
        with _as_output_error(path):
            write(tmp)

    def folder(self, path: str, fill: Callable[[str], None]) -> None:
        """Stage a folder: ``fill`` gets an empty temporary folder to write into."""
        _, tmp = self._temporary(path, ".tmp", folder=True)
        with _as_output_error(path):
            fill(tmp)

    def __exit__(self, kind, value, tb) -> None:
        with _signals_deferred():
            if kind is not None:
                self._discard()
                return
            try:
                for tmp, target in self.staged:
                    _move_into_place(tmp, target)
            except BaseException:
                self._discard()
                raise

    def _temporary(self, path: str, suffix: str, folder: bool = False) -> tuple[int | None, str]:
        """A new temporary path beside ``path``, noted at once so that it is always cleaned up."""
        if any(_same_path(path, target) for _, target in self.staged):
            raise OutputError(f"two outputs would both write {path}.", "give each output a path of its own")
        if os.path.lexists(path) and not self.force:
            raise OutputError(f"{path} already exists.", "pass --force to overwrite it, or choose another path")
        with _signals_deferred(), _as_output_error(path):
            if folder:
                fd, tmp = None, tempfile.mkdtemp(dir=_folder_of(path), prefix=TEMP_PREFIX, suffix=suffix)
            else:
                fd, tmp = tempfile.mkstemp(dir=_folder_of(path), prefix=TEMP_PREFIX, suffix=suffix)
            self.staged.append((tmp, path))
        return fd, tmp

    def _discard(self) -> None:
        for tmp, _ in self.staged:
            _remove(tmp)


@contextmanager
def atomic_file(path, binary: bool = True, name: str | None = None, hint: str = HINT):
    """An open temporary file beside ``path``, renamed onto it (replacing what is there) when
    the block ends without error, removed otherwise. ``name`` is what an OutputError calls
    the file (``path`` by default), ``hint`` its hint."""
    path = os.fspath(path)
    with _signals_deferred(), _as_output_error(path, name, hint):
        fd, tmp = tempfile.mkstemp(dir=_folder_of(path), prefix=TEMP_PREFIX, suffix=".tmp")
    try:
        with _as_output_error(path, name, hint), os.fdopen(fd, "wb" if binary else "w") as f:
            yield f
        with _signals_deferred():
            _move_into_place(tmp, path, name, hint)
    except BaseException:
        _remove(tmp)
        raise


@contextmanager
def _signals_deferred():
    """SIGINT and SIGTERM that arrive in the block are delivered when it ends, to whatever
    handles them then (Python's KeyboardInterrupt, the CLI's handler, or the default)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    stops = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.getsignal(s) for s in stops}
    for s, handler in previous.items():
        if handler is not signal.SIG_IGN:
            signal.signal(s, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        for s in dict.fromkeys(caught):
            signal.raise_signal(s)


def _same_path(a: str, b: str) -> bool:
    return os.path.normcase(os.path.realpath(a)) == os.path.normcase(os.path.realpath(b))


def _folder_of(path: str) -> str:
    return os.path.dirname(os.path.abspath(path))


class _as_output_error:
    """An OSError while writing ``path`` becomes an OutputError with one sentence."""

    def __init__(self, path: str, name: str | None = None, hint: str = HINT) -> None:
        self.path, self.name, self.hint = path, name, hint

    def __enter__(self):
        return self

    def __exit__(self, kind, value, tb):
        if kind is not None and issubclass(kind, OSError):
            raise OutputError(f"cannot write {self.name or self.path}: {value.strerror or value}.", self.hint) from value
        return False


def _move_into_place(tmp: str, target: str, name: str | None = None, hint: str = HINT) -> None:
    with _as_output_error(target, name, hint):
        _default_permissions(tmp)
        if os.path.isdir(tmp) and os.path.lexists(target):
            # os.replace cannot put a folder over another: move the old one aside first
            old = tempfile.mkdtemp(dir=_folder_of(target), prefix=TEMP_PREFIX, suffix=".old")
            os.rmdir(old)
            os.replace(target, old)
            os.replace(tmp, target)
            _remove(old)
        else:
            os.replace(tmp, target)


def _default_permissions(path: str) -> None:
    """The mode ``open``/``mkdir`` would have given (temporary paths are private until renamed)."""
    umask = os.umask(0)
    os.umask(umask)
    for top, dirs, files in os.walk(path) if os.path.isdir(path) else [("", [], [path])]:
        for name in files:
            os.chmod(os.path.join(top, name), 0o666 & ~umask)
        for name in dirs:
            os.chmod(os.path.join(top, name), 0o777 & ~umask)
    if os.path.isdir(path):
        os.chmod(path, 0o777 & ~umask)


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.unlink(path)
