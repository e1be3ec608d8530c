"""Read-only file tools confined to one root folder.

:class:`FileSandbox` resolves every path the model gives against the root and refuses
``..`` components, absolute paths outside the root, and symlinks whose target leaves
it; it never writes. :func:`file_tools` binds ``read_file`` and ``list_files`` to a
sandbox. The default root is ``$AGENTRT_FILES_ROOT`` or the current directory,
looked up at call time.
"""
from __future__ import annotations

import fnmatch
import os
from pathlib import Path, PurePath

from agentrt.registry import Tool, ToolRegistry

__all__ = ["FileAccessError", "FileSandbox", "file_tools"]

ROOT_ENV = "AGENTRT_FILES_ROOT"


class FileAccessError(PermissionError):
    """A path the sandbox refuses (outside the root, too big, binary...)."""


class FileSandbox:
    """Read-only access to the files under ``root``.

    Args:
        root: the folder; None = ``$AGENTRT_FILES_ROOT`` or the current directory at each call.
        max_file_bytes: files larger than this are refused.
        max_chars: the most characters one read returns (the rest is announced, not sent).
        max_entries: the most entries one listing returns.
        allow_hidden: whether names starting with "." (``.env``, ``.git``, ``.ssh``) may be
            listed and read; off by default because secrets live there.
        allow_hard_links: whether a file with more than one hard link may be read; off by default,
            because a hard link inside the root can name a file outside it, and no path check sees that.
        text_only: refuse files that are not UTF-8 text by their content (a NUL byte anywhere, or bytes
            that do not decode); off, such bytes are read with U+FFFD in their place.
    """

    def __init__(self, root: str | os.PathLike[str] | None = None, *, max_file_bytes: int = 2_000_000,
                 max_chars: int = 8_000, max_entries: int = 200, allow_hidden: bool = False,
                 allow_hard_links: bool = False, text_only: bool = True):
        self._root = None if root is None else Path(root)
        if self._root is not None and not self._root.is_dir():
            raise NotADirectoryError(f"file tools root {str(root)!r} is not a folder")
        self.max_file_bytes = max_file_bytes
        self.max_chars = max_chars
        self.max_entries = max_entries
        self.allow_hidden = allow_hidden
        self.allow_hard_links = allow_hard_links
        self.text_only = text_only

    @property
    def root(self) -> Path:
        """The resolved root folder."""
        root = self._root if self._root is not None else Path(os.environ.get(ROOT_ENV) or os.getcwd())
        return root.resolve()

    def resolve(self, path: str) -> Path:
        """The real path of ``path`` (relative to the root) if it stays inside the root."""
        root = self.root
        text = (path or ".").strip()
        if "\x00" in text:
            raise FileAccessError("path contains a NUL character")
        pure = PurePath(text)
        if ".." in pure.parts:
            raise FileAccessError(f"'..' is not allowed in paths: {path!r}")
        candidate = Path(text) if pure.is_absolute() else root / text
        real = candidate.resolve()  # follows symlinks: a link pointing outside is caught here
        if real != root and root not in real.parents:
            raise FileAccessError(f"{path!r} is outside the allowed folder")
        if not self.allow_hidden and self._hidden(real.relative_to(root)):
            raise FileAccessError(f"{path!r} is a hidden file or folder (its name starts with '.')")
        return real

    @staticmethod
    def _hidden(rel: PurePath) -> bool:
        return any(part.startswith(".") for part in rel.parts)

    def read_text(self, path: str) -> tuple[Path, str]:
        """(real path, whole text) of a file the sandbox lets the model read: a regular file inside the
        root, within ``max_file_bytes``, with one hard link and text content (unless allowed otherwise).
        A UTF-8 byte-order mark is dropped."""
        real = self.resolve(path)
        if not real.exists():
            raise FileNotFoundError(f"no file {path!r} (use list_files to see what exists)")
        if real.is_dir():
            raise IsADirectoryError(f"{path!r} is a folder; use list_files")
        if not real.is_file():  # a FIFO or device would block or never end
            raise FileAccessError(f"{path!r} is not a regular file")
        st = real.stat()
        if st.st_nlink > 1 and not self.allow_hard_links:
            raise FileAccessError(f"{path!r} has {st.st_nlink} hard links; one of them may lie outside the allowed "
                                  "folder, so it is not read (FileSandbox(allow_hard_links=True) allows it)")
        if st.st_size > self.max_file_bytes:
            raise FileAccessError(f"{path!r} is {st.st_size} bytes; the limit is {self.max_file_bytes}")
        data = real.read_bytes()
        if self.text_only:
            if b"\x00" in data:
                raise FileAccessError(f"{path!r} is a binary file (it contains NUL bytes)")
            try:
                return real, data.decode("utf-8-sig")
            except UnicodeDecodeError as e:
                raise FileAccessError(f"{path!r} is not UTF-8 text (byte {e.start} does not decode)") from None
        return real, data.decode("utf-8-sig", errors="replace")

    def read(self, path: str, start_line: int = 1, max_lines: int = 200) -> str:
        """Lines ``start_line``.. of a text file (at most ``max_lines`` and ``max_chars``)."""
        if start_line < 1 or max_lines < 1:
            raise ValueError("start_line and max_lines must be >= 1")
        lines = self.read_text(path)[1].splitlines()
        if start_line > max(len(lines), 1):
            raise ValueError(f"{path!r} has only {len(lines)} lines; start_line must be <= {max(len(lines), 1)}")
        chosen = lines[start_line - 1:start_line - 1 + max_lines]
        text = "\n".join(chosen)
        end = start_line - 1 + len(chosen)
        notes = []
        if len(text) > self.max_chars:
            text = text[: self.max_chars]
            notes.append(f"[cut at {self.max_chars} characters]")
        if end < len(lines):
            notes.append(f"[lines {start_line}-{end} of {len(lines)}; read on with start_line={end + 1}]")
        return "\n".join([text, *notes]) if notes else text

    def list(self, path: str = ".", pattern: str = "*") -> list[str]:
        """Names in a folder (folders end with '/'), sorted, filtered by a glob ``pattern``."""
        real = self.resolve(path)
        if not real.is_dir():
            raise NotADirectoryError(f"{path!r} is not a folder")
        root = self.root
        entries = []
        for child in sorted(real.iterdir(), key=lambda p: p.name):
            if not fnmatch.fnmatch(child.name, pattern or "*"):
                continue
            if child.name.startswith(".") and not self.allow_hidden:
                continue
            target = child.resolve()
            if target != root and root not in target.parents:
                continue  # a symlink leading out of the root is not shown
            if not self.allow_hidden and self._hidden(target.relative_to(root)):
                continue  # nor one leading into a hidden folder
            entries.append(child.name + ("/" if target.is_dir() else ""))
        if len(entries) > self.max_entries:
            more = len(entries) - self.max_entries
            entries = entries[: self.max_entries] + [f"...and {more} more"]
        return entries


def file_tools(root: str | os.PathLike[str] | None = None, **limits: int) -> list[Tool]:
    """``read_file`` and ``list_files`` tools confined to ``root`` (see :class:`FileSandbox`)."""
    sandbox = FileSandbox(root, **limits)
    reg = ToolRegistry()

    @reg.tool
    def read_file(path: str, start_line: int = 1, max_lines: int = 200) -> str:
        """Read a text file from the allowed folder.

        Args:
            path: File path relative to the folder, e.g. "notes/todo.txt".
            start_line: First line to read (1 = the beginning).
            max_lines: How many lines to read at most.
        """
        return sandbox.read(path, start_line, max_lines)

    @reg.tool
    def list_files(path: str = ".", pattern: str = "*") -> list[str]:
        """List the files and folders (names ending in "/") in a folder.

        Args:
            path: Folder relative to the allowed folder; "." is the folder itself.
            pattern: Only names matching this glob, e.g. "*.csv".
        """
        return sandbox.list(path, pattern)

    return list(reg)
