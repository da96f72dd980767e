"""Output files: check that a path can be written before the long work, then write it atomically.

    check_writable_file(args.json, "--json")          # ValueError naming the option, before any work
    check_writable_dir(args.plot, "--plot")
    ...
    write_json(result, args.json)                     # temp file next to the path, then os.replace
    save_png(fig, os.path.join(args.plot, "x.png"))
    with atomic_write(path) as f: ...                 # anything else

A reader never sees a half-written file, and a failed write leaves the old file (or none) in place.
Nothing here imports the rest of posenc, so every layer (analysis, bench, eval, training, cli) can use it.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile

__all__ = ["check_writable_file", "check_writable_dir", "atomic_write", "write_json", "save_png"]

_UMASK = os.umask(0o022)  # read once at import (os.umask can only be read by setting it)
os.umask(_UMASK)


def _probe(directory: str, what: str, path: str) -> None:
    """Create and remove a file in directory: permissions, read-only file systems and root all answer truly
    (os.access says yes to root even on a read-only mount)."""
    try:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".posenc-probe-")
        os.close(fd)
        os.remove(tmp)
    except OSError as e:
        raise ValueError(f"{what}: cannot write {path}: {e.strerror or e}") from None


def check_writable_file(path, what: str = "path", suffix: str | None = None) -> str:
    """Raise ValueError (starting with `what`, e.g. the option's name) unless a file can be written at path:
    not a directory, its directory exists and takes new files, and (if given) the name ends in `suffix`.
    Leaves nothing behind. Returns the path."""
    path = os.fspath(path)
    if not path:
        raise ValueError(f"{what}: expected a file path, got ''")
    if suffix and not path.lower().endswith(suffix.lower()):
        raise ValueError(f"{what}: expected a file name ending in {suffix}, got {path!r}")
    if os.path.isdir(path):
        raise ValueError(f"{what}: {path} is a directory; expected a file path")
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise ValueError(f"{what}: cannot write {path}: no such directory {directory}")
    _probe(directory, what, path)
    return path


def check_writable_dir(path, what: str = "directory") -> str:
    """Raise ValueError (starting with `what`) unless path is a directory that takes new files, or can be made
    one (its nearest existing parent is a directory that takes new files). Creates nothing. Returns the path."""
    path = os.fspath(path)
    if not path:
        raise ValueError(f"{what}: expected a directory, got ''")
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{what}: {path} exists and is not a directory")
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ValueError(f"{what}: cannot create {path}: {existing} is not a directory")
    _probe(existing, what, path)
    return path


@contextlib.contextmanager
def atomic_write(path, mode: str = "w", **open_kwargs):
    """Open a temporary file next to path; when the block ends without an error it replaces path
    (os.replace, atomic on one file system), else it is removed. The file gets the usual permissions
    (0o666 less the umask; mkstemp's are 0o600)."""
    path = os.fspath(path)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=f".{os.path.basename(path)}.",
                               suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **open_kwargs) as f:
            yield f
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def write_json(obj, path, **dump_kwargs) -> None:
    """obj as indented JSON (NaN allowed, as Python's json writes it) to path, atomically."""
    dump_kwargs = {"indent": 1, "allow_nan": True, **dump_kwargs}
    with atomic_write(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, **dump_kwargs)
        f.write("\n")


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display), imported only when a plot is asked for; ImportError
    saying how to get it otherwise."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError("plots need matplotlib: pip install matplotlib") from exc
    return plt


def save_png(fig, path, **savefig_kwargs) -> str:
    """A matplotlib figure as PNG at exactly path (matplotlib's savefig appends ".png" to a name without an
    extension), atomically. Returns the path."""
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", **savefig_kwargs)
    return os.fspath(path)
