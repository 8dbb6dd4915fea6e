"""Opening the files a user or a checkpoint names: regular files only, inside their folder.

Two rules every reader in this package follows, so that a hostile or careless path gives one
clear line instead of a hang or a leak:

* Only regular files are read. A FIFO blocks `open` until a writer appears and a device
  reads forever or as empty, so both are refused from `stat` before opening, and the open
  itself is non-blocking and re-checked on the descriptor (the path may be swapped between).
* A file a checkpoint names (a shard in its index, its config, its tokenizer files) must lie
  inside the checkpoint: the name is relative without `..`, and the resolved path (symlinks
  followed) stays under the checkpoint's root.

Torch-free, like `config`.
"""
from __future__ import annotations

import io
import os
import stat
from pathlib import Path


class UnsafePathError(ValueError):
    """A path that is not a regular file, or that leads outside the folder it must stay in."""


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def check_regular_file(path: str | os.PathLike, what: str = "file") -> Path:
    """`path` if it names an existing regular file (after symlinks); raises otherwise.

    Missing files raise FileNotFoundError (an OSError, as `open` would); anything that exists
    but is not a regular file raises UnsafePathError without being opened.
    """
    p = Path(path)
    st = os.stat(p)  # FileNotFoundError / PermissionError as `open` would give them
    if not stat.S_ISREG(st.st_mode):
        raise UnsafePathError(f"{what} {os.fspath(p)!r} is {_kind(st.st_mode)}, not a regular file")
    return p


def open_regular(path: str | os.PathLike, what: str = "file") -> io.BufferedReader:
    """Open a regular file for binary reading, never blocking on a FIFO or device."""
    p = check_regular_file(path, what)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_BINARY", 0)
    fd = os.open(p, flags)
    try:
        st = os.fstat(fd)  # the path may have been swapped for a FIFO since the stat above
        if not stat.S_ISREG(st.st_mode):
            raise UnsafePathError(f"{what} {os.fspath(p)!r} is {_kind(st.st_mode)}, not a regular file")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_text(path: str | os.PathLike, what: str = "file", max_bytes: int = 64 << 20) -> str:
    """A regular file's UTF-8 text; refuses files larger than `max_bytes` before reading them."""
    with open_regular(path, what) as f:
        size = os.fstat(f.fileno()).st_size
        if size > max_bytes:
            raise UnsafePathError(f"{what} {os.fspath(path)!r} is {size:,} bytes, more than the {max_bytes:,} "
                                  "a file of this kind may hold")
        data = f.read(max_bytes + 1)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UnsafePathError(f"{what} {os.fspath(path)!r} is not UTF-8 text (byte {e.start})") from e


def inside(root: str | os.PathLike, name: str, folder: str | os.PathLike | None = None, what: str = "file") -> Path:
    """`folder / name`, refused unless it resolves to a path under `root` (default: `folder`).

    `name` comes from a file (an index, a config): it must be a non-empty relative path
    without `..`; the resolved target (every symlink followed) must stay under the resolved
    `root`, which for a Hugging Face cache snapshot is the repo's cache folder (its files
    are links into `blobs/`).
    """
    base = Path(folder if folder is not None else root)
    if not isinstance(name, str) or not name or "\x00" in name:
        raise UnsafePathError(f"{what} name {name!r} is not a file name")
    rel = Path(name)
    if rel.is_absolute() or ".." in rel.parts or rel.drive:
        raise UnsafePathError(f"{what} {name!r} points outside the checkpoint folder")
    path = base / rel
    real_root = Path(root).resolve()
    if not path.resolve().is_relative_to(real_root):
        raise UnsafePathError(f"{what} {name!r} is a link that leads outside the checkpoint folder")
    return path
