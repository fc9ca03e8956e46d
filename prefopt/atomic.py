"""Atomic writes: a reader (or the next run, after a crash) sees the old file or directory whole, or the new
one whole, never half of either.

One primitive, :func:`atomic_path`: write into the temporary sibling it yields; on success the contents
are fsynced and renamed onto the target (a rename within one directory is atomic); on any exception the
temporary is removed and the target is left as it was. :func:`write_text`, :func:`write_json` and
:func:`write_jsonl` are one-liners over it.

A directory that already exists at the target is swapped with the new one in one step (Linux
``renameat2(RENAME_EXCHANGE)``) and deleted after. Where the filesystem cannot exchange, the old one is
first renamed aside to ``.old-<name>``: a crash between that rename and the next leaves it whole there,
and the next :func:`atomic_path` for the same target puts it back before doing anything else.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import secrets
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any


def staging_dir(target: str | Path) -> Path:
    """Where :func:`atomic_path` builds a directory for ``target``: a fixed name, so that other processes
    that write into it (every rank of a sharded checkpoint) can find it, and a crash's leftover is known."""
    target = Path(target)
    return target.with_name(f".tmp-{target.name}")


def _aside(target: Path) -> Path:
    return target.with_name(f".old-{target.name}")


@contextlib.contextmanager
def atomic_path(target: str | Path, *, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``target`` to write; on success it replaces ``target`` atomically.

    ``directory=False``: the temporary is a new empty file with a unique name (concurrent writers of the
    same target do not collide; the last rename wins, whole). ``directory=True``: it is the created,
    empty :func:`staging_dir` (a stale one from a crash is removed first); only one writer may build a
    given directory at a time. The parent folder is created if missing. Permissions follow the umask,
    as for any new file or directory.
    """
    target = Path(target)
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    if directory:
        _recover(target)
        tmp = staging_dir(target)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    else:
        tmp = _new_file(target)
    try:
        yield tmp
        if directory:
            _fsync_tree(tmp)
            _replace_dir(tmp, target)
        else:
            _fsync_file(tmp)
            os.replace(tmp, target)
        _fsync_dir(parent)
    except BaseException:
        _remove(tmp)
        raise


def write_text(target: str | Path, text: str, encoding: str = "utf-8") -> Path:
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding=encoding)
    return Path(target)


def write_json(target: str | Path, obj: Any, **dumps: Any) -> Path:
    """``dumps``: keyword arguments of :func:`json.dumps` (``indent``, ``ensure_ascii``, ...)."""
    return write_text(target, json.dumps(obj, **dumps))


def write_jsonl(target: str | Path, rows: Iterable[dict]) -> Path:
    return write_text(target, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


# ---------------------------------------------------------------------------- internals


def _new_file(target: Path) -> Path:
    while True:
        tmp = target.with_name(f".tmp-{target.name}.{secrets.token_hex(4)}")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # 0o666 & ~umask, like open()
            return tmp
        except FileExistsError:
            continue


def _replace_dir(new: Path, target: Path) -> None:
    """Put directory ``new`` at ``target``; an existing ``target`` is replaced (and deleted)."""
    if not os.path.lexists(target):
        os.rename(new, target)
        return
    if _exchange(new, target):  # target is now the new tree, ``new`` the old one
        _fsync_dir(target.parent)
        _remove(new)
        return
    aside = _aside(target)
    _remove(aside)
    os.rename(target, aside)  # from here to the next rename the old tree is whole at ``aside``
    try:
        os.rename(new, target)
    except BaseException:
        os.rename(aside, target)
        raise
    _fsync_dir(target.parent)
    _remove(aside)


def _recover(target: Path) -> None:
    """Undo a crash of the fallback in :func:`_replace_dir`: the old tree back in place, or its leftover gone."""
    aside = _aside(target)
    if not os.path.lexists(aside):
        return
    if os.path.lexists(target):
        _remove(aside)
    else:
        os.rename(aside, target)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_renameat2 = None


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux >= 3.15, glibc >= 2.28); False where that is not possible."""
    global _renameat2
    if _renameat2 is None:
        try:
            fn = ctypes.CDLL(None, use_errno=True).renameat2
            fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
            fn.restype = ctypes.c_int
            _renameat2 = fn
        except (OSError, AttributeError):
            _renameat2 = False
    if not _renameat2:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):  # this filesystem cannot
        return False
    raise OSError(err, os.strerror(err), str(b))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_tree(path: Path) -> None:
    for p in sorted(path.rglob("*"), reverse=True):  # files before the folders that hold them
        if p.is_symlink():
            continue
        if p.is_file():
            _fsync_file(p)
        elif p.is_dir():
            _fsync_dir(p)
    _fsync_dir(path)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems cannot fsync a directory; the rename is still atomic
        pass
    finally:
        os.close(fd)
