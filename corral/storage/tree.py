"""Safe reading and writing of an untrusted directory tree; shared by every backend.

The reference's sync followed symlinks, so a sandbox could plant ``ln -s /etc/shadow
x`` in its workspace and have the host copy the target into storage. Here:

* :func:`walk_regular_files` lists a tree through directory file descriptors and
  ``lstat`` only: it descends into real directories, never into symlinks, and
  reports symlinks, fifos, sockets and devices as skipped.
* :class:`TreeReader` opens a file relative to the root one component at a time
  with ``O_NOFOLLOW`` (and ``O_NONBLOCK``, so a fifo swapped in cannot hang us), then
  ``fstat``-checks that it is a regular file. The walk is only a plan; this check
  is the guard, so a sandbox that swaps a file for a symlink after the walk (a
  race) still gets nothing out.
* :class:`TreeWriter` writes below its root the same way: every directory is
  opened with ``O_NOFOLLOW | O_DIRECTORY`` relative to its parent, every file is
  written to a fresh ``O_EXCL | O_NOFOLLOW`` temp file and ``os.replace``-d onto
  its name (atomic per file; a symlink already at that name is replaced, never
  written through). :func:`safe_relparts` rejects absolute keys, ``..`` and ``.``.

The root directory itself is the host's choice and trusted (it may be a symlink);
everything below it is not. Linux/POSIX only (``dir_fd`` support is required).
"""

from __future__ import annotations

import errno
import os
import secrets
import stat
from dataclasses import dataclass, field
from typing import BinaryIO, Callable, Optional

from corral.errors import InvalidRequest, NotFound

__all__ = [
    "FileEntry",
    "FileMeta",
    "SkipEntry",
    "TreeReader",
    "TreeScan",
    "TreeWriter",
    "empty_dirs",
    "safe_relparts",
    "walk_regular_files",
]

_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | _CLOEXEC


class SkipEntry(Exception):
    """One entry cannot be transferred safely; the sync goes on and reports ``reason``."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class FileEntry:
    """A regular file found by the walk: its relative path (``/``-separated) and lstat."""

    rel: str
    size: int
    mode: int
    mtime_ns: int

    @property
    def parts(self) -> tuple[str, ...]:
        return tuple(self.rel.split("/"))


@dataclass(frozen=True)
class FileMeta:
    """Metadata a writer applies to a file after filling it (permission bits, mtime)."""

    mode: Optional[int] = None
    mtime_ns: Optional[int] = None


@dataclass
class TreeScan:
    """The result of :func:`walk_regular_files`."""

    files: list[FileEntry] = field(default_factory=list)
    dirs: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)


#: The short name of each file type and its test, in the order they are asked.
_KINDS = {
    "symlink (not followed)": stat.S_ISLNK,
    "fifo": stat.S_ISFIFO,
    "socket": stat.S_ISSOCK,
    "character device": stat.S_ISCHR,
    "block device": stat.S_ISBLK,
    "directory": stat.S_ISDIR,
    "regular file": stat.S_ISREG,
}


def kind_of(mode: int) -> str:
    """A short name for a file type, used as the reason an entry was skipped."""
    return next((name for name, is_kind in _KINDS.items() if is_kind(mode)), "unknown file type")


def _join(prefix: str, name: str) -> str:
    return f"{prefix}/{name}" if prefix else name


def walk_regular_files(root: str) -> TreeScan:
    """Every regular file and directory under ``root``, never following a symlink.

    Anything else (symlinks to files or directories, fifos, sockets, devices,
    unreadable directories) lands in ``skipped`` with a reason. Order: parents
    before children. Raises :class:`NotFound` if ``root`` is not a directory.
    """
    try:
        root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | _CLOEXEC)
    except (FileNotFoundError, NotADirectoryError) as e:
        raise NotFound(f"not a directory: {root}", path=root) from e
    scan = TreeScan()
    stack: list[tuple[int, str]] = [(root_fd, "")]
    while stack:
        dir_fd, prefix = stack.pop()
        try:
            with os.scandir(dir_fd) as it:
                entries = sorted(it, key=lambda e: e.name)
            for entry in entries:
                rel = _join(prefix, entry.name)
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    scan.skipped.append((rel, "vanished"))
                    continue
                if stat.S_ISREG(st.st_mode):
                    scan.files.append(FileEntry(rel, st.st_size, st.st_mode, st.st_mtime_ns))
                elif stat.S_ISDIR(st.st_mode):
                    try:
                        sub = os.open(entry.name, _DIR_FLAGS, dir_fd=dir_fd)
                    except OSError as e:
                        scan.skipped.append((rel, _open_dir_reason(dir_fd, entry.name, e)))
                        continue
                    scan.dirs.append(rel)
                    stack.append((sub, rel))
                else:
                    scan.skipped.append((rel, kind_of(st.st_mode)))
        finally:
            os.close(dir_fd)
    scan.dirs.sort()
    return scan


def empty_dirs(scan: TreeScan) -> list[str]:
    """The directories of ``scan`` that hold no file or directory that was found."""
    parents = set()
    for rel in [f.rel for f in scan.files] + scan.dirs:
        head = rel.rpartition("/")[0]
        while head and head not in parents:
            parents.add(head)
            head = head.rpartition("/")[0]
    return [d for d in scan.dirs if d not in parents]


def safe_relparts(key: str) -> tuple[str, ...]:
    """Split a relative key into path components, rejecting anything that could escape.

    Rejects empty keys, absolute keys, NUL bytes, and ``.``, ``..`` or empty
    components (``a//b``). Raises :class:`InvalidRequest`.
    """
    if not key or key.startswith("/") or "\x00" in key:
        raise InvalidRequest(f"unsafe key {key!r}", key=key)
    parts = tuple(key.split("/"))
    if any(p in ("", ".", "..") for p in parts):
        raise InvalidRequest(f"unsafe key {key!r}", key=key)
    return parts


def _open_dir_reason(dir_fd: int, name: str, err: OSError) -> str:
    """Why ``name`` (in ``dir_fd``) could not be opened as a directory, from its lstat."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return "vanished"
    except OSError:
        return f"unreadable: {err.strerror or err}"
    if stat.S_ISDIR(st.st_mode):
        return f"unreadable: {err.strerror or err}"
    return f"path crosses a {kind_of(st.st_mode).split(' (')[0]}"


class _Rooted:
    """Holds an fd on the trusted root and opens directories below it without following links."""

    def __init__(self, root: str) -> None:
        self.root = root
        self._root_fd: Optional[int] = None

    def __enter__(self):
        try:
            self._root_fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | _CLOEXEC)
        except (FileNotFoundError, NotADirectoryError) as e:
            raise NotFound(f"not a directory: {self.root}", path=self.root) from e
        return self

    def __exit__(self, *exc) -> None:
        if self._root_fd is not None:
            os.close(self._root_fd)
            self._root_fd = None

    def _open_dir(self, parts: tuple[str, ...], create: bool) -> int:
        """An fd on the directory ``parts`` below the root (the caller closes it)."""
        assert self._root_fd is not None, "use as a context manager"
        cur = os.dup(self._root_fd)
        try:
            for name in parts:
                if create:
                    try:
                        os.mkdir(name, 0o755, dir_fd=cur)
                    except FileExistsError:
                        pass  # a directory is fine; anything else fails the open below
                    except OSError as e:
                        if e.errno == errno.ENAMETOOLONG:
                            raise SkipEntry("name too long") from e
                        raise
                try:
                    nxt = os.open(name, _DIR_FLAGS, dir_fd=cur)
                except OSError as e:
                    if e.errno in (errno.ENOTDIR, errno.ELOOP, errno.ENOENT, errno.EACCES, errno.ENAMETOOLONG):
                        raise SkipEntry(_open_dir_reason(cur, name, e)) from e
                    raise
                os.close(cur)
                cur = nxt
        except BaseException:
            os.close(cur)
            raise
        return cur


class TreeReader(_Rooted):
    """Opens regular files below a root; refuses symlinks anywhere on the way."""

    def open_file(self, parts: tuple[str, ...]) -> tuple[BinaryIO, os.stat_result]:
        """A binary file object and its fstat, or :class:`SkipEntry` if it is not a plain file."""
        pfd = self._open_dir(parts[:-1], create=False)
        try:
            try:
                # lstat first, so a device node is never opened (opening some has side
                # effects); the fstat below still guards the remaining race.
                pre = os.stat(parts[-1], dir_fd=pfd, follow_symlinks=False)
                if not stat.S_ISREG(pre.st_mode):
                    raise SkipEntry(kind_of(pre.st_mode))
                fd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | _CLOEXEC, dir_fd=pfd)
            except FileNotFoundError as e:
                raise SkipEntry("vanished") from e
            except OSError as e:
                if e.errno == errno.ELOOP:
                    raise SkipEntry("symlink (not followed)") from e
                if e.errno in (errno.ENXIO, errno.ENODEV, errno.EOPNOTSUPP):
                    raise SkipEntry(_open_dir_reason(pfd, parts[-1], e)) from e
                raise SkipEntry(f"unreadable: {e.strerror or e}") from e
        finally:
            os.close(pfd)
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise SkipEntry(kind_of(st.st_mode))
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb"), st


class TreeWriter(_Rooted):
    """Creates directories and atomically writes files below a root, never through a link."""

    def make_dir(self, parts: tuple[str, ...]) -> None:
        """Create ``parts`` (and its parents) below the root; :class:`SkipEntry` if a non-dir is in the way."""
        os.close(self._open_dir(parts, create=True))

    def write_file(self, parts: tuple[str, ...], fill: Callable[[BinaryIO], Optional[FileMeta]]) -> int:
        """Write ``parts`` with what ``fill(out)`` writes; returns the size written.

        ``fill`` may return a :class:`FileMeta` to apply (mode bits, mtime). The file
        appears under its name only once complete (temp file + ``os.replace``).
        """
        pfd = self._open_dir(parts[:-1], create=True)
        name = parts[-1]
        tmp = f".{name[:32]}.corral-{secrets.token_hex(6)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | _CLOEXEC, 0o600, dir_fd=pfd)
            try:
                with os.fdopen(fd, "wb") as out:
                    meta = fill(out) or FileMeta()
                    out.flush()
                    mode = 0o644 if meta.mode is None else meta.mode & 0o777  # never setuid/setgid
                    os.fchmod(out.fileno(), mode)
                    if meta.mtime_ns is not None:
                        os.utime(out.fileno(), ns=(meta.mtime_ns, meta.mtime_ns))
                    size = os.fstat(out.fileno()).st_size
                try:
                    os.replace(tmp, name, src_dir_fd=pfd, dst_dir_fd=pfd)
                except OSError as e:
                    if e.errno in (errno.EISDIR, errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
                        raise SkipEntry("a directory is in the way") from e
                    if e.errno == errno.ENAMETOOLONG:
                        raise SkipEntry("name too long") from e
                    raise
            except BaseException:
                try:
                    os.unlink(tmp, dir_fd=pfd)
                except OSError:
                    pass
                raise
        finally:
            os.close(pfd)
        return size
