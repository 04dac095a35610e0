"""Write files atomically: to a temporary name in the same folder, fsync, then rename.

- Readers see the old file or the new one, never a partial one.
- A failed write removes its temporary file and re-raises the *original* error (a cleanup
  that fails too, e.g. on a read-only filesystem, never hides it).
- A writer killed outright (``kill -9``, power loss) cannot clean up: its temporary file is
  named after the host and process id, and the next save to the same place removes the
  temporaries of processes on this host that no longer run.
- Missing folders above the file are created; a failed write removes those it created, and a
  folder where the file should be, or a file where a folder should be, is refused up front
  naming the caller (``save_adapter``, ...) and both paths.
- :func:`atomic_write_many` replaces several files together: all are written to temporaries
  first, then renamed; if a rename fails the files already replaced are put back, so on error
  every file keeps its old content.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
from collections.abc import Callable, Mapping
from pathlib import Path

_MARK = ".lorambo-tmp."  # .<file name>.lorambo-tmp.<host>.<pid>.<token>


def _host() -> str:
    return socket.gethostname().replace(".", "_") or "localhost"


def _temp_path(path: Path, kind: str = "new") -> Path:
    return path.with_name(f".{path.name}{_MARK}{_host()}.{os.getpid()}.{kind}{secrets.token_hex(4)}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):  # exists but belongs to someone else, or cannot tell
        return True
    return True


def remove_orphans(path: str | os.PathLike) -> list[Path]:
    """Delete temporaries left next to ``path`` by dead writers on this host; returns them."""
    path = Path(path)
    removed = []
    prefix = f".{path.name}{_MARK}"
    try:
        candidates = [p for p in path.parent.iterdir() if p.name.startswith(prefix)]
    except OSError:
        return removed
    for candidate in candidates:
        parts = candidate.name[len(prefix):].split(".")
        if len(parts) < 3 or not parts[-2].isdigit():
            continue
        host, pid = ".".join(parts[:-2]), int(parts[-2])
        if host != _host() or pid == os.getpid() or _alive(pid):
            continue
        with contextlib.suppress(OSError):
            candidate.unlink()
            removed.append(candidate)
    return removed


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every platform / filesystem can open a directory
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _discard(*paths: Path) -> None:
    for p in paths:
        with contextlib.suppress(OSError):  # never let cleanup hide the error being raised
            p.unlink()


def check_target(path: Path, caller: str) -> None:
    """Raise, naming ``caller`` and the paths, unless a file can be written at ``path``: a folder
    there (IsADirectoryError) or a file where a folder above it must be (NotADirectoryError)
    would otherwise surface as the rename's or mkdir's bare OS error, about a temporary name."""
    if path.is_dir():
        raise IsADirectoryError(f"{caller}: cannot write the file {path}: a folder of that name exists")
    existing = path.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise NotADirectoryError(f"{caller}: cannot write {path}: {existing} is a file, not a folder")


def _make_parents(folder: Path, created: list[Path]) -> None:
    """Create ``folder`` and its missing parents, appending each one created to ``created``
    (outermost first), so that a caller's cleanup also covers a failure midway."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    for new in reversed(missing):
        try:
            new.mkdir()
        except FileExistsError:  # made meanwhile by another writer (another process): not ours
            if not new.is_dir():
                raise
            continue
        created.append(new)


def _remove_folders(created: list[Path]) -> None:
    """Remove the folders a failed write created (innermost first, only while empty)."""
    for folder in reversed(created):
        with contextlib.suppress(OSError):
            folder.rmdir()


def _stage(path: Path, write: Callable[[str], None]) -> Path:
    """Write ``path``'s new content to a fsynced temporary next to it; returns the temporary."""
    remove_orphans(path)
    tmp = _temp_path(path)
    try:
        write(str(tmp))
        _fsync_file(tmp)
    except BaseException:
        _discard(tmp)
        raise
    return tmp


def atomic_write(path: str | os.PathLike, write: Callable[[str], None], caller: str = "write") -> Path:
    """Call ``write(tmp_path)`` and move the result to ``path`` (its missing folders created);
    a failure leaves no file and no folder behind and never a partial ``path`` (readers see the
    old file or the new one). Errors about the path name ``caller`` (see :func:`check_target`)."""
    path = Path(path)
    check_target(path, caller)
    created: list[Path] = []
    try:
        _make_parents(path.parent, created)
        tmp = _stage(path, write)
        try:
            os.replace(tmp, path)
        except BaseException:
            _discard(tmp)
            raise
    except BaseException:
        _remove_folders(created)
        raise
    _fsync_dir(path.parent)
    return path


def _keep_old(path: Path) -> Path | None:
    """A second name for ``path``'s current content (hard link, else a copy), or None."""
    if not path.exists():
        return None
    backup = _temp_path(path, "old")
    try:
        os.link(path, backup)
    except OSError:
        shutil.copy2(path, backup)
    return backup


def atomic_write_many(writes: Mapping[str | os.PathLike, Callable[[str], None]], caller: str = "write") -> list[Path]:
    """Replace every file of ``{path: write}`` or, on any error, none of them (and remove the
    folders this call created)."""
    paths = [Path(p) for p in writes]
    for path in paths:
        check_target(path, caller)
    created: list[Path] = []
    try:
        for path in paths:
            _make_parents(path.parent, created)
        return _replace_all(paths, list(writes.values()))
    except BaseException:
        _remove_folders(created)
        raise


def _replace_all(paths: list[Path], writers: list[Callable[[str], None]]) -> list[Path]:
    staged: list[tuple[Path, Path]] = []
    try:
        for path, write in zip(paths, writers):
            staged.append((path, _stage(path, write)))
    except BaseException:
        _discard(*(tmp for _, tmp in staged))
        raise
    done: list[tuple[Path, Path | None]] = []
    try:
        for path, tmp in staged:
            backup = _keep_old(path)
            done.append((path, backup))
            os.replace(tmp, path)
    except BaseException:
        for path, backup in reversed(done):  # put back what was already replaced
            with contextlib.suppress(OSError):
                if backup is not None:
                    os.replace(backup, path)
                else:
                    path.unlink()
        _discard(*(tmp for _, tmp in staged), *(b for _, b in done if b is not None))
        raise
    _discard(*(b for _, b in done if b is not None))
    for folder in {p.parent for p, _ in staged}:
        _fsync_dir(folder)
    return [p for p, _ in staged]


def atomic_write_text(path: str | os.PathLike, text: str, caller: str = "write") -> Path:
    return atomic_write(path, text_writer(text), caller)


def text_writer(text: str) -> Callable[[str], None]:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)

    return write


def atomic_save_figure(fig, path: str | os.PathLike, caller: str = "write", **savefig_kwargs) -> Path:
    """``fig.savefig`` (matplotlib) through a temporary file; the format follows ``path``'s
    suffix (default png), since the temporary's name has none matplotlib knows."""
    fmt = Path(path).suffix.lstrip(".") or "png"
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format=fmt, **savefig_kwargs), caller)
