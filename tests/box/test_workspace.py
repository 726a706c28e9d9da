"""Workspace path confinement and file operations (pure: no server, no kernel)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import corral
from corral.box.workspace import Workspace


@pytest.fixture
def ws(tmp_path: Path) -> Workspace:
    return Workspace(tmp_path / "root")


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A directory beside the workspace root, outside the workspace."""
    d = tmp_path / "outside"
    d.mkdir()
    return d


def test_relative_absolute_and_alias_paths_resolve_inside(ws: Workspace) -> None:
    root = ws.root
    assert ws.resolve("a/b.txt") == root / "a" / "b.txt"
    assert ws.resolve(".") == root
    assert ws.resolve(str(root / "x")) == root / "x"
    assert ws.resolve("/workspace") == root
    assert ws.resolve("/workspace/x/y") == root / "x" / "y"
    assert ws.resolve("a/../b") == root / "b"


@pytest.mark.parametrize("path", ["..", "../x", "a/../../x", "/etc/passwd", "/", "/workspace/../etc/passwd"])
def test_escapes_are_forbidden(ws: Workspace, path: str) -> None:
    with pytest.raises(corral.Forbidden):
        ws.resolve(path)


def test_a_sibling_sharing_the_prefix_is_forbidden(ws: Workspace) -> None:
    sibling = Path(str(ws.root) + "2")
    sibling.mkdir()
    (sibling / "secret").write_text("s")
    with pytest.raises(corral.Forbidden):
        ws.resolve(str(sibling / "secret"))
    with pytest.raises(corral.Forbidden):
        ws.resolve("../" + sibling.name + "/secret")
    # "/workspace2" is not the alias either.
    with pytest.raises(corral.Forbidden):
        ws.resolve("/workspace2/x")


def test_symlinks_pointing_out_are_forbidden(ws: Workspace, outside: Path) -> None:
    (outside / "secret.txt").write_text("secret")
    os.symlink(outside / "secret.txt", ws.root / "file_link")
    os.symlink(outside, ws.root / "dir_link")
    for path in ("file_link", "dir_link", "dir_link/secret.txt", "dir_link/new.txt"):
        with pytest.raises(corral.Forbidden):
            ws.resolve(path)
    with pytest.raises(corral.Forbidden):
        ws.open_for_read("file_link")
    # The link itself (not its target) may be inspected and removed.
    assert ws.exists("file_link")
    ws.delete("dir_link")
    assert (outside / "secret.txt").read_text() == "secret"
    assert not os.path.lexists(ws.root / "dir_link")


def test_a_symlink_inside_the_workspace_is_followed(ws: Workspace) -> None:
    (ws.root / "real").mkdir()
    os.symlink(ws.root / "real", ws.root / "alias")
    assert ws.resolve("alias/f") == ws.root / "real" / "f"


async def test_write_read_list_and_entries(ws: Workspace) -> None:
    entry = await ws.write_bytes("d/e/f.bin", b"\x00\x01payload")
    assert entry == {"path": "d/e/f.bin", "name": "f.bin", "type": "file", "size": 9, "mtime_ms": entry["mtime_ms"]}
    assert isinstance(entry["mtime_ms"], int) and entry["mtime_ms"] > 0
    real, size = ws.open_for_read("/workspace/d/e/f.bin")
    assert size == 9 and b"".join([c async for c in ws.iter_file(real)]) == b"\x00\x01payload"
    # No temp files are left beside the target.
    assert os.listdir(ws.root / "d" / "e") == ["f.bin"]

    assert [e["path"] for e in ws.list(".", depth=1)] == ["d"]
    assert [e["path"] for e in ws.list(".", depth=3)] == ["d", "d/e", "d/e/f.bin"]
    assert ws.list("d/e/f.bin") == [ws.entry(real)]
    with pytest.raises(corral.NotFound):
        ws.list("nope")
    with pytest.raises(corral.InvalidRequest):
        ws.list(".", depth=0)


def test_list_does_not_enter_symlinked_dirs(ws: Workspace, outside: Path) -> None:
    (outside / "hidden.txt").write_text("x")
    os.symlink(outside, ws.root / "link")
    entries = ws.list(".", depth=5)
    assert [(e["path"], e["type"]) for e in entries] == [("link", "symlink")]


def test_read_errors(ws: Workspace) -> None:
    (ws.root / "dir").mkdir()
    with pytest.raises(corral.NotFound):
        ws.open_for_read("missing")
    with pytest.raises(corral.InvalidRequest, match="directory"):
        ws.open_for_read("dir")
    with pytest.raises(corral.InvalidRequest):
        ws.resolve("")
    with pytest.raises(corral.InvalidRequest):
        ws.resolve("a\x00b")


def test_mkdir_delete_move(ws: Workspace) -> None:
    assert ws.mkdir("a/b") is True
    assert ws.mkdir("a/b") is False
    with pytest.raises(corral.NotFound):
        ws.mkdir("x/y", parents=False)
    (ws.root / "a" / "b" / "f").write_text("f")
    with pytest.raises(corral.Conflict):
        ws.mkdir("a/b/f")
    with pytest.raises(corral.Conflict):
        ws.delete("a")  # not empty
    entry = ws.move("a/b/f", "c/g")
    assert entry["path"] == "c/g" and (ws.root / "c" / "g").read_text() == "f"
    with pytest.raises(corral.Conflict):
        ws.move("a", "c")
    with pytest.raises(corral.NotFound):
        ws.move("missing", "z")
    with pytest.raises(corral.InvalidRequest):
        ws.move("a", "a/inside")
    ws.delete("a", recursive=True)
    assert not (ws.root / "a").exists()
    with pytest.raises(corral.NotFound):
        ws.delete("a")
    with pytest.raises(corral.Forbidden):
        ws.delete(".")


def test_wipe_empties_the_root_without_following_links(ws: Workspace, outside: Path) -> None:
    (outside / "keep.txt").write_text("keep")
    (ws.root / "d" / "e").mkdir(parents=True)
    (ws.root / "d" / "e" / "f").write_text("x")
    (ws.root / ".hidden").write_text("x")
    os.symlink(outside, ws.root / "link")
    os.symlink(outside, ws.root / "d" / "link")
    ws.wipe()
    assert ws.root.is_dir() and os.listdir(ws.root) == []
    assert (outside / "keep.txt").read_text() == "keep"
