"""Tools from MCP servers: :class:`MCPClient` connects to one server and offers its tools as agentrt `Tool`s.

    with MCPClient("python -m mcp_server_time") as time_server:
        agent = Agent(llm, [*time_server.tools, my_tool])

A command line starts the server over stdio; an ``http(s)://`` URL connects over streamable
HTTP. The session is opened once, in a thread of its own (so the tools work from any event loop
and from sync code), and closed by ``close()``, at the end of a ``with`` block, or at exit. Each
server tool's JSON Schema becomes the tool's schema, so the model's calls are grammar-constrained
like any ``@tool``; a schema with keywords the grammar cannot enforce is refused by name. A result
comes back as the text (or structured JSON) the server sent; a result the server marks as an
error, a server that died and a call that outlives its timeout all become error results the
model reads, never a stuck run. Needs the ``mcp`` extra (``pip install 'agentrt[mcp]'``).
"""
from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import math
import shlex
import tempfile
import weakref
from typing import Any, AsyncIterator, NoReturn, Sequence

import anyio
import anyio.from_thread
import pydantic

from agentrt.engine.grammar import GrammarCompileError, UnsupportedSchemaError, schema_to_regex
from agentrt.registry import Tool, ToolDefinitionError

__all__ = ["MCPClient", "MCPError", "MCPToolError"]

log = logging.getLogger("agentrt.mcp")

DEFAULT_CALL_TIMEOUT_S = 60.0
DEFAULT_CONNECT_TIMEOUT_S = 30.0
# schema_to_regex is the grammar's own check of a schema; a pathological one must not hold up start-up
SCHEMA_CHECK_TIMEOUT_S = 5.0


class MCPError(RuntimeError):
    """An MCP server that cannot be started, reached or understood (the message says which and why)."""


class MCPToolError(RuntimeError):
    """A tool result that the MCP server marked as an error; its text is the message."""


_open_clients: weakref.WeakSet[MCPClient] = weakref.WeakSet()


@atexit.register
def _close_open_clients() -> None:
    for client in list(_open_clients):
        client.close()


class MCPClient:
    """One MCP server's tools, from a connection opened once.

    Args:
        server: a command line (a string, split like a shell does, or a list of arguments) that
            starts the server over stdio, or the ``http://``/``https://`` URL of a streamable HTTP
            endpoint.
        name: what log lines and errors call the server (default: the command or URL).
        prefix: put ``{prefix}_`` before each tool's name (two servers with the same tool name).
        env: environment variables added for a stdio server.
        call_timeout_s: the longest a tool call may take before it becomes an error result.
        connect_timeout_s: the longest start-up, handshake and tool listing may take.
        skip_unsupported: leave out (with a warning naming them) the tools whose schemas the
            grammar cannot enforce, instead of refusing the whole server.

    Raises:
        MCPError: the server could not be started, did not answer in time, or sent a tool list
            that is not valid MCP.
        ToolDefinitionError: tools whose schemas cannot be enforced (each named with its keywords),
            unless ``skip_unsupported``.
    """

    def __init__(self, server: str | Sequence[str], *, name: str | None = None, prefix: str | None = None,
                 env: dict[str, str] | None = None, call_timeout_s: float = DEFAULT_CALL_TIMEOUT_S,
                 connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S, skip_unsupported: bool = False):
        try:
            import mcp  # noqa: F401 - fail here, with the extra's name, rather than deep in a thread
        except ImportError as exc:
            raise ImportError("MCP support needs the 'mcp' package: pip install 'agentrt[mcp]'") from exc
        self.argv = _argv(server)
        self.name = name or (self.argv[0] if _is_url(self.argv) else " ".join(self.argv))
        self.call_timeout_s = call_timeout_s
        self._env = env
        self._dead: str | None = None  # why the server can no longer answer
        # a stdio server's stderr, kept so that errors can quote why it failed
        self._stderr = None if _is_url(self.argv) else tempfile.TemporaryFile("w+", encoding="utf-8", errors="replace")
        self._portal_cm = anyio.from_thread.start_blocking_portal()
        self._portal = self._portal_cm.__enter__()
        self._connection = self._portal.wrap_async_context_manager(self._connect(connect_timeout_s))
        try:
            self._session, listed = self._connection.__enter__()
        except BaseException as exc:
            self._portal_cm.__exit__(None, None, None)
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            raise MCPError(f"MCP server {self.name!r}: {_describe(exc)}{self._stderr_tail()}") from exc
        _open_clients.add(self)
        self.tools: list[Tool] = self._tools(listed, prefix, skip_unsupported)

    # -- lifecycle ------------------------------------------------------------------
    def close(self) -> None:
        """End the session and stop the server process (stdio); safe to call twice."""
        if self._portal_cm is None:
            return
        _open_clients.discard(self)
        portal_cm, self._portal_cm = self._portal_cm, None
        self._dead = self._dead or "the connection was closed"
        with contextlib.suppress(Exception):  # a server that died already has nothing to close
            self._connection.__exit__(None, None, None)
        with contextlib.suppress(Exception):
            portal_cm.__exit__(None, None, None)
        if self._stderr is not None:
            self._stderr.close()

    def __enter__(self) -> MCPClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> MCPClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await anyio.to_thread.run_sync(self.close)

    def __repr__(self) -> str:
        return f"MCPClient({self.name!r}, tools={[t.name for t in self.tools]!r})"

    # -- connecting (runs in the portal's event loop) ------------------------------------
    @contextlib.asynccontextmanager
    async def _connect(self, timeout_s: float) -> AsyncIterator[tuple[Any, list[Any]]]:
        from mcp import ClientSession

        # One scope around the whole connection (the transports' task groups nest inside it), whose
        # deadline is lifted once the tools are listed: only start-up is timed.
        with anyio.CancelScope(deadline=anyio.current_time() + timeout_s) as scope:
            async with contextlib.AsyncExitStack() as stack:
                read, write = await stack.enter_async_context(self._transport())
                session = await stack.enter_async_context(ClientSession(read, write))
                await session.initialize()
                listed = await _list_all_tools(session)
                scope.deadline = math.inf
                yield session, listed
                return
        raise MCPError(f"did not answer within {timeout_s:g} s (start-up, handshake and tool list)")

    def _transport(self) -> Any:
        if _is_url(self.argv):
            from mcp.client.streamable_http import streamable_http_client

            return streamable_http_client(self.argv[0])
        from mcp import StdioServerParameters, stdio_client

        return stdio_client(StdioServerParameters(command=self.argv[0], args=self.argv[1:], env=self._env),
                            errlog=self._stderr)

    def _stderr_tail(self, limit: int = 600) -> str:
        """``"; its stderr ends: ..."`` for a stdio server that wrote any, else ``""``."""
        if self._stderr is None or self._stderr.closed:
            return ""
        with contextlib.suppress(OSError, ValueError):
            self._stderr.flush()
            self._stderr.seek(0)
            text = self._stderr.read().strip()
            self._stderr.seek(0, 2)
            if text:
                return f"; its stderr ends: {text[-limit:]}"
        return ""

    # -- tools ----------------------------------------------------------------------
    def _tools(self, listed: list[Any], prefix: str | None, skip_unsupported: bool) -> list[Tool]:
        tools: list[Tool] = []
        refused: list[str] = []
        for spec in listed:
            name = f"{prefix}_{spec.name}" if prefix else spec.name
            problem = enforceability_problem(spec.input_schema)
            if problem is None:
                try:
                    tools.append(Tool.from_json_schema(name, dict(spec.input_schema), self._caller(spec.name),
                                                       description=spec.description or "",
                                                       timeout_s=self.call_timeout_s))
                    continue
                except ToolDefinitionError as exc:
                    problem = "; ".join(exc.problems)
            refused.append(f"tool {name!r}: {problem}")
        if refused and not skip_unsupported:
            self.close()
            raise ToolDefinitionError(self.name, [*refused, "pass skip_unsupported=True (or leave the tools out "
                                                  "on the server) to use the server's other tools"])
        for reason in refused:
            log.warning("MCP server %r: left out %s", self.name, reason)
        return tools

    def _caller(self, remote_name: str) -> Any:
        async def call(**arguments: Any) -> Any:
            return await self._call(remote_name, arguments)

        call.__name__ = remote_name
        return call

    async def _call(self, remote_name: str, arguments: dict[str, Any]) -> Any:
        """Run one call in the session's loop and wait for it from the caller's loop."""
        if self._dead is not None or self._portal_cm is None:
            raise MCPError(f"MCP server {self.name!r} is not available: {self._dead}")
        future = self._portal.start_task_soon(self._remote_call, remote_name, arguments)
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:  # the registry's timeout or the run's cancellation
            future.cancel()
            raise

    async def _remote_call(self, remote_name: str, arguments: dict[str, Any]) -> Any:
        from mcp.shared.exceptions import MCPError as ProtocolError

        from mcp.types import CONNECTION_CLOSED

        try:
            # the registry times calls out (and says so); the SDK's own limit is a backstop for direct use
            result = await self._session.call_tool(remote_name, arguments,
                                                   read_timeout_seconds=self.call_timeout_s + 5)
        except ProtocolError as exc:
            if exc.code != CONNECTION_CLOSED:  # the server answered with a JSON-RPC error: it is still there
                raise MCPToolError(exc.message) from None
            self._stopped(exc.message)
        except Exception as exc:  # noqa: BLE001 - a broken pipe, a closed stream: the server is gone
            self._stopped(_describe(exc))
        return _result_value(result)

    def _stopped(self, why: str) -> NoReturn:
        """The session is over: every later call fails at once, with this reason and the server's last words."""
        self._dead = why + self._stderr_tail()
        log.error("MCP server %r stopped answering (%s); its tools now return errors", self.name, self._dead)
        raise MCPError(f"MCP server {self.name!r} stopped answering: {self._dead}")


def enforceability_problem(schema: Any) -> str | None:
    """Why the grammar cannot enforce ``schema`` (its keywords, named), or None when it can."""
    try:
        schema_to_regex(schema, timeout_s=SCHEMA_CHECK_TIMEOUT_S)
    except UnsupportedSchemaError as exc:
        return "its input schema uses keywords the grammar cannot enforce: " + "; ".join(exc.keywords)
    except GrammarCompileError as exc:
        return f"its input schema cannot be compiled: {exc}"
    return None


async def _list_all_tools(session: Any) -> list[Any]:
    """Every tool the server lists, following pagination cursors."""
    from mcp.types import PaginatedRequestParams

    tools: list[Any] = []
    cursor: str | None = None
    while True:
        try:
            page = await session.list_tools(params=PaginatedRequestParams(cursor=cursor) if cursor else None)
        except pydantic.ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            raise MCPError(f"the server sent a tool list that is not valid MCP: {problems}") from None
        tools.extend(page.tools)
        cursor = page.next_cursor
        if not cursor:
            return tools


def _result_value(result: Any) -> Any:
    """What the model reads of a CallToolResult: structured content as JSON, else the text blocks."""
    text = "\n".join(_block_text(block) for block in result.content)
    if result.is_error:
        raise MCPToolError(text or "the tool failed without a message")
    if result.structured_content is not None:
        return result.structured_content
    return text


def _block_text(block: Any) -> str:
    kind = getattr(block, "type", "")
    if kind == "text":
        return block.text
    if kind == "resource":  # an embedded resource: its text, or what it is
        inner = block.resource
        return getattr(inner, "text", None) or f"[resource {inner.uri} ({inner.mime_type or 'binary'})]"
    if kind == "resource_link":
        return f"[resource {block.uri}]"
    return f"[{kind} content ({getattr(block, 'mime_type', None) or 'unknown type'}) not shown]"


def _argv(server: str | Sequence[str]) -> list[str]:
    argv = shlex.split(server) if isinstance(server, str) else [str(a) for a in server]
    if not argv:
        raise ValueError("MCPClient needs a command line or a URL, got an empty one")
    return argv


def _is_url(argv: list[str]) -> bool:
    return len(argv) == 1 and argv[0].startswith(("http://", "https://"))


def _describe(exc: BaseException) -> str:
    """One line for an exception, looking inside exception groups (task groups wrap transport errors)."""
    inner = getattr(exc, "exceptions", None)  # an exception group (Python 3.10 has no builtin name for it)
    if isinstance(inner, (list, tuple)) and inner:
        return "; ".join(_describe(e) for e in inner)
    message = str(exc).strip()
    if isinstance(exc, MCPError) or not message:  # ours say what happened; others need their type
        return message or type(exc).__name__
    return f"{type(exc).__name__}: {message}"
