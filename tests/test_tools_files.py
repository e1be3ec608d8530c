"""Read-only file tools: reading and listing under the root, and every refusal
(.., absolute paths outside, escaping symlinks, hidden files, size, binary)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from agentrt.registry import ToolRegistry
from agentrt.tools.files import FileAccessError, FileSandbox, file_tools
from agentrt.types import ToolCall


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    (root / "notes").mkdir(parents=True)
    (root / "notes" / "todo.txt").write_text("\n".join(f"line {i}" for i in range(1, 11)) + "\n")
    (root / "readme.md").write_text("# Hello\nworld\n")
    (root / "data.csv").write_text("a,b\n1,2\n")
    (root / ".env").write_text("SECRET=1\n")
    (root / ".git").mkdir()
    (root / "blob.bin").write_bytes(b"\x00\x01\x02" * 10)
    (root / "big.txt").write_text("x" * 5000)
    outside = tmp_path / "outside.txt"
    outside.write_text("top secret\n")
    os.symlink(outside, root / "escape.txt")
    os.symlink(tmp_path, root / "escape_dir")
    os.symlink(root / "notes", root / "inner_link")
    os.symlink(root / ".env", root / "env_link")
    return root


def test_read_whole_and_windowed(tree: Path) -> None:
    box = FileSandbox(tree)
    assert box.read("readme.md") == "# Hello\nworld"
    assert box.read("notes/todo.txt", start_line=3, max_lines=2) == (
        "line 3\nline 4\n[lines 3-4 of 10; read on with start_line=5]")
    assert box.read("./notes/todo.txt", max_lines=1).startswith("line 1")
    assert box.read(str(tree / "readme.md")) == "# Hello\nworld"  # absolute inside the root is fine
    assert box.read("inner_link/todo.txt", max_lines=1).startswith("line 1")  # symlink staying inside


def test_list(tree: Path) -> None:
    box = FileSandbox(tree)
    assert box.list() == ["big.txt", "blob.bin", "data.csv", "inner_link/", "notes/", "readme.md"]
    assert box.list("notes") == ["todo.txt"]
    assert box.list(".", "*.csv") == ["data.csv"]
    assert FileSandbox(tree, max_entries=2).list() == ["big.txt", "blob.bin", "...and 4 more"]
    assert ".env" in FileSandbox(tree, allow_hidden=True).list()


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("../outside.txt", r"'\.\.' is not allowed"),
        ("notes/../../outside.txt", r"'\.\.' is not allowed"),
        ("/etc/passwd", "outside the allowed folder"),
        ("escape.txt", "outside the allowed folder"),
        ("escape_dir/outside.txt", "outside the allowed folder"),
        (".env", "hidden file"),
        (".git/config", "hidden file"),
        ("env_link", "hidden file"),
        ("big.txt", "5000 bytes; the limit is 1000"),
        ("blob.bin", "binary file"),
        ("a\x00b", "NUL"),
    ],
)
def test_read_refusals(tree: Path, path: str, message: str) -> None:
    with pytest.raises(FileAccessError, match=message):
        FileSandbox(tree, max_file_bytes=1000).read(path)


def test_other_errors(tree: Path) -> None:
    box = FileSandbox(tree)
    with pytest.raises(FileNotFoundError, match="use list_files"):
        box.read("nope.txt")
    with pytest.raises(IsADirectoryError):
        box.read("notes")
    with pytest.raises(NotADirectoryError):
        box.list("readme.md")
    with pytest.raises(FileAccessError):
        box.list("..")
    with pytest.raises(NotADirectoryError, match="is not a folder"):
        FileSandbox(tree / "missing")
    assert FileSandbox(tree, max_chars=5).read("readme.md") == "# Hel\n[cut at 5 characters]"
    with pytest.raises(ValueError, match="has only 2 lines"):
        box.read("readme.md", start_line=3)
    os.mkfifo(tree / "pipe")
    with pytest.raises(FileAccessError, match="not a regular file"):
        box.read("pipe")
    (tree / "empty.txt").write_text("")
    assert box.read("empty.txt") == ""


def test_default_root_from_environment(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENTRT_FILES_ROOT", str(tree / "notes"))
    assert FileSandbox().list() == ["todo.txt"]
    monkeypatch.delenv("AGENTRT_FILES_ROOT")
    monkeypatch.chdir(tree)
    assert "readme.md" in FileSandbox().list()


async def test_as_tools(tree: Path) -> None:
    reg = ToolRegistry(file_tools(tree))
    assert reg.names == ["read_file", "list_files"]
    res = await reg.call(ToolCall(id="1", name="list_files", arguments={"path": "notes"}))
    assert (res.is_error, res.content) == (False, '["todo.txt"]')
    res = await reg.call(ToolCall(id="2", name="read_file", arguments={"path": "readme.md"}))
    assert res.content == "# Hello\nworld"
    res = await reg.call(ToolCall(id="3", name="read_file", arguments={"path": "../outside.txt"}))
    assert res.is_error and res.content == "FileAccessError: '..' is not allowed in paths: '../outside.txt'"
    res = await reg.call(ToolCall(id="4", name="read_file", arguments={"path": "escape.txt"}))
    assert res.is_error and "top secret" not in res.content


def test_hard_links_and_non_text_content_are_refused(tree: Path, tmp_path: Path) -> None:
    """A hard link inside the root can name a file outside it, which no path check sees; and a file is
    text by all of its content, not by its first 4 KiB."""
    secret = tmp_path / "secret.txt"
    secret.write_text("top secret\n")
    os.link(secret, tree / "linked.txt")
    (tree / "late_nul.txt").write_bytes(b"a" * 5000 + b"\x00tail")
    (tree / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    box = FileSandbox(tree)
    with pytest.raises(FileAccessError, match="2 hard links"):
        box.read("linked.txt")
    with pytest.raises(FileAccessError, match="NUL"):
        box.read("late_nul.txt")
    with pytest.raises(FileAccessError, match="not UTF-8 text"):
        box.read("latin1.txt")
    (tree / "rows.csv").write_bytes(b"a,b\n1,\x002\n")
    with pytest.raises(FileAccessError, match="NUL"):  # query_data reads through the same check
        from agentrt.tools.data import load_records

        load_records("rows.csv", box)
    allowed = FileSandbox(tree, allow_hard_links=True, text_only=False)
    assert allowed.read("linked.txt") == "top secret"
    assert allowed.read("latin1.txt") == "caf\ufffd"
