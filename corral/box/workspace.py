"""The box's workspace: path confinement and file operations.

:class:`Workspace` owns one root directory. Every path a caller names goes
through :meth:`Workspace.resolve`, which resolves symlinks with ``realpath`` and
compares by path components (``os.path.commonpath``), so ``..``, absolute paths
elsewhere, symlinks pointing out and a sibling such as ``<root>2`` are all
refused with :class:`corral.Forbidden`. ``/workspace/...`` is accepted as an
alias of the root because the reference's clients always send it.

The blocking file calls are small and local; the async ones (reading and
writing whole files) run their disk I/O in a worker thread so a large upload
never stalls the event loop.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import AsyncIterator, Optional

from ..errors import Conflict, Forbidden, InvalidRequest, NotFound

__all__ = ["Workspace", "WORKSPACE_ALIAS", "CHUNK_SIZE"]

#: The absolute path the reference's clients use for the workspace root.
WORKSPACE_ALIAS = "/workspace"
#: Bytes per read when streaming a file out.
CHUNK_SIZE = 1 << 16


#: The entry types the workspace reports, by their file-type test; anything else is "other".
_KINDS = {"symlink": stat.S_ISLNK, "dir": stat.S_ISDIR, "file": stat.S_ISREG}


def _kind(mode: int) -> str:
    return next((name for name, is_kind in _KINDS.items() if is_kind(mode)), "other")


class Workspace:
    """Owns the workspace root; every path in and out is confined to it.

    ``wipe()`` is idempotent; the rest act once per call.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        root_path = Path(root)
        root_path.mkdir(parents=True, exist_ok=True)
        self.root = Path(os.path.realpath(root_path))

    # --- paths ---

    def _inside(self, real: str) -> bool:
        root = str(self.root)
        try:
            return os.path.commonpath([root, real]) == root
        except ValueError:  # mixed absolute/relative can't happen after realpath, but be safe
            return False

    def _candidate(self, path: str) -> str:
        if not isinstance(path, str) or path == "":
            raise InvalidRequest("path: must be a non-empty string")
        if "\x00" in path:
            raise InvalidRequest("path: must not contain NUL bytes")
        if os.path.isabs(path):
            norm = os.path.normpath(path)
            # The alias is matched by components, so "/workspace2/x" is not under it.
            if norm == WORKSPACE_ALIAS or norm.startswith(WORKSPACE_ALIAS + os.sep):
                rest = os.path.relpath(norm, WORKSPACE_ALIAS)
                return str(self.root) if rest == "." else os.path.join(self.root, rest)
            return path
        return os.path.join(self.root, path)

    def resolve(self, path: str, *, follow_last: bool = True) -> Path:
        """The real path for ``path``, or :class:`corral.Forbidden` if it lies outside the root.

        With ``follow_last=False`` the last component is not resolved (the
        parent is), so a symlink inside the workspace can itself be deleted,
        moved or listed even when it points out.
        """
        candidate = self._candidate(path)
        if follow_last:
            real = os.path.realpath(candidate)
        else:
            norm = os.path.normpath(candidate)
            parent, name = os.path.split(norm)
            real = os.path.join(os.path.realpath(parent), name) if name not in ("", "..") else os.path.realpath(norm)
        if not self._inside(real):
            raise Forbidden(f"path {path!r} is outside the workspace")
        return Path(real)

    def relative(self, real: Path) -> str:
        rel = os.path.relpath(real, self.root)
        return "." if rel == "." else rel.replace(os.sep, "/")

    def entry(self, real: Path) -> dict:
        """``{path, name, type, size, mtime_ms}`` for a path inside the root (not following a final symlink)."""
        st = os.lstat(real)
        rel = self.relative(real)
        return {
            "path": rel,
            "name": real.name if rel != "." else "",
            "type": _kind(st.st_mode),
            "size": st.st_size,
            "mtime_ms": int(st.st_mtime_ns // 1_000_000),
        }

    # --- reading ---

    def open_for_read(self, path: str) -> tuple[Path, int]:
        """Check that ``path`` is a readable regular file; returns (real path, size)."""
        real = self.resolve(path)
        try:
            st = os.stat(real)
        except FileNotFoundError:
            raise NotFound(f"no such file: {path!r}") from None
        if stat.S_ISDIR(st.st_mode):
            raise InvalidRequest(f"path: {path!r} is a directory, not a file")
        if not stat.S_ISREG(st.st_mode):
            raise InvalidRequest(f"path: {path!r} is not a regular file")
        return real, st.st_size

    async def iter_file(self, real: Path) -> AsyncIterator[bytes]:
        """Stream a file in chunks; disk reads run in a worker thread."""
        f = await asyncio.to_thread(open, real, "rb")
        try:
            while True:
                chunk = await asyncio.to_thread(f.read, CHUNK_SIZE)
                if not chunk:
                    return
                yield chunk
        finally:
            f.close()

    def exists(self, path: str) -> bool:
        # A path outside the root answers 403, not False: callers learn nothing about the host.
        real = self.resolve(path, follow_last=False)
        return os.path.lexists(real)

    def list(self, path: str = ".", depth: int = 1) -> list[dict]:
        """Entries below ``path`` down to ``depth`` levels; symlinked dirs are listed, not entered."""
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
            raise InvalidRequest(f"depth: must be an integer >= 1, got {depth!r}")
        real = self.resolve(path)
        if not os.path.lexists(real):
            raise NotFound(f"no such path: {path!r}")
        if not real.is_dir():
            return [self.entry(real)]
        out: list[dict] = []
        self._walk(real, depth, out)
        return out

    def _walk(self, directory: Path, depth: int, out: list[dict]) -> None:
        try:
            with os.scandir(directory) as it:
                children = sorted(it, key=lambda e: e.name)
        except (PermissionError, FileNotFoundError):
            return
        for child in children:
            child_path = Path(child.path)
            try:
                out.append(self.entry(child_path))
            except FileNotFoundError:  # removed while we listed
                continue
            if depth > 1 and child.is_dir(follow_symlinks=False):
                self._walk(child_path, depth - 1, out)

    # --- writing ---

    async def write_stream(self, path: str, chunks: AsyncIterator[bytes]) -> dict:
        """Write a file from an async byte stream: to a temp file beside it, then ``os.replace``."""
        real = self.resolve(path)
        if real == self.root or real.is_dir():
            raise Conflict(f"path {path!r} is a directory")
        parent = real.parent
        try:
            await asyncio.to_thread(parent.mkdir, parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise Conflict(f"a parent of {path!r} is not a directory") from None
        # The parent may itself be a symlink created meanwhile; re-check after mkdir.
        self.resolve(str(real))
        fd, tmp = tempfile.mkstemp(prefix=".corral-upload-", dir=parent)
        try:
            with os.fdopen(fd, "wb") as f:
                async for chunk in chunks:
                    if chunk:
                        await asyncio.to_thread(f.write, chunk)
            os.replace(tmp, real)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
        return self.entry(real)

    async def write_bytes(self, path: str, data: bytes) -> dict:
        async def one() -> AsyncIterator[bytes]:
            yield data

        return await self.write_stream(path, one())

    def mkdir(self, path: str, parents: bool = True) -> bool:
        """Create a directory; False if it already exists. A file in the way is a conflict."""
        real = self.resolve(path)
        if real.is_dir():
            return False
        if os.path.lexists(real):
            raise Conflict(f"{path!r} exists and is not a directory")
        try:
            real.mkdir(parents=parents)
        except FileNotFoundError:
            raise NotFound(f"the parent of {path!r} does not exist (pass parents=true)") from None
        except FileExistsError:
            return False
        except NotADirectoryError:
            raise Conflict(f"a parent of {path!r} is not a directory") from None
        return True

    def delete(self, path: str, recursive: bool = False) -> None:
        """Delete a file, a symlink (not its target) or a directory (non-empty only with ``recursive``)."""
        real = self.resolve(path, follow_last=False)
        if real == self.root:
            raise Forbidden("the workspace root itself cannot be deleted")
        try:
            st = os.lstat(real)
        except FileNotFoundError:
            raise NotFound(f"no such path: {path!r}") from None
        if stat.S_ISDIR(st.st_mode):
            if recursive:
                shutil.rmtree(real)  # rmtree never follows symlinks inside the tree
            else:
                try:
                    os.rmdir(real)
                except OSError:
                    raise Conflict(f"directory {path!r} is not empty (pass recursive=true)") from None
        else:
            os.unlink(real)

    def move(self, source: str, destination: str) -> dict:
        """Rename ``source`` to ``destination`` (parents created); an existing destination is a conflict."""
        src = self.resolve(source, follow_last=False)
        dst = self.resolve(destination, follow_last=False)
        if src == self.root or dst == self.root:
            raise Forbidden("the workspace root itself cannot be moved")
        if not os.path.lexists(src):
            raise NotFound(f"no such path: {source!r}")
        if os.path.lexists(dst):
            raise Conflict(f"destination {destination!r} already exists")
        if os.path.commonpath([str(src), str(dst)]) == str(src):
            raise InvalidRequest(f"destination: cannot move {source!r} into itself")
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(src), str(dst))
        return self.entry(dst)

    def wipe(self) -> None:
        """Delete everything inside the root (never the root; symlinks are unlinked, not followed)."""
        wipe_dir(self.root)


def wipe_dir(root: Path, keep: Optional[set[str]] = None) -> None:
    """Empty ``root`` without following symlinks out of it; names in ``keep`` stay."""
    try:
        children = list(os.scandir(root))
    except FileNotFoundError:
        return
    for child in children:
        if keep and child.name in keep:
            continue
        try:
            if child.is_dir(follow_symlinks=False):
                shutil.rmtree(child.path, ignore_errors=True)
            else:
                os.unlink(child.path)
        except FileNotFoundError:
            pass
