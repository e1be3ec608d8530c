"""Incremental parser of the model's fixed output format, for streaming.

The model answers a tool turn with compact JSON, keys in this order::

    {"calls":[{"tool":"<name>","arguments":{...}}, ...]}    # one or more tool calls
    {"answer":"<text>"}  or  {"answer": <value>}              # a final answer

`ToolCallStreamParser` reads that text as it is generated, a delta at a time, and turns
it into events a client can forward at once (the server's SSE, the LangChain adapter's
``astream``): the answer's characters as they arrive (unescaped), the start of each tool
call as soon as its name is complete, and each call's arguments JSON in fragments whose
concatenation is exactly the arguments' JSON text.

In mode ``"text"`` and ``"schema"`` the whole output is content (free text, or the JSON
object of an output schema), so every delta becomes a `ContentDelta` unchanged.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal, Union

from agentrt.types import ToolCall, new_call_id

Mode = Literal["tools", "schema", "text"]


@dataclass(frozen=True)
class ContentDelta:
    """Characters of the answer (unescaped when the answer is a JSON string)."""

    text: str


@dataclass(frozen=True)
class ToolCallStart:
    """A tool call begins: its position in the turn, a fresh id and the tool's name."""

    index: int
    id: str
    name: str


@dataclass(frozen=True)
class ToolCallArgsDelta:
    """A fragment of call ``index``'s arguments JSON; the fragments concatenate to it."""

    index: int
    json_fragment: str


StreamEvent = Union[ContentDelta, ToolCallStart, ToolCallArgsDelta]

_WS = " \t\n\r"
_SCALAR_CHARS = set("0123456789+-.eEtrufalsn")
_ESCAPES = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}


@dataclass
class _Frame:
    kind: Literal["obj", "arr"]
    state: str  # obj: "key_or_end" | "key" | "colon" | "value" | "comma_or_end"; arr: "value_or_end" | "value" | "comma_or_end"
    key: str | None = None
    index: int = -1


@dataclass
class _Call:
    index: int
    id: str
    name: str | None = None
    started: bool = False
    args: list[str] = field(default_factory=list)  # fragments, all of them (for .tool_calls)
    pending: list[str] = field(default_factory=list)  # fragments seen before the name
    saw_args: bool = False


class ToolCallStreamParser:
    """Feed the model's output a delta at a time; get `StreamEvent`s back.

    ``mode`` is the `PromptPlan.mode` of the turn: ``"tools"`` parses the calls/answer
    format; ``"schema"`` and ``"text"`` pass every delta through as content. `feed`
    raises ``ValueError`` on text that cannot be the fixed format; `finish` raises it
    when the output stopped before the JSON was complete (e.g. cut by max_tokens).
    """

    def __init__(self, mode: Mode = "tools"):
        if mode not in ("tools", "schema", "text"):
            raise ValueError(f"mode must be 'tools', 'schema' or 'text', not {mode!r}")
        self.mode: Mode = mode
        self._text = ""  # everything fed so far (tools mode), for raw fragments
        self._pos = 0
        self._stack: list[_Frame] = []
        self._started = False  # the top-level value has begun
        self._ended = False  # ... and is complete
        # the value being scanned: None | "string" | "scalar"
        self._lex: str | None = None
        self._str_is_key = False
        self._str_buf: list[str] = []  # decoded chars of the current string
        self._esc: str | None = None  # None, "\\" or "u" + hex digits so far
        self._high_surrogate: int | None = None
        self._scalar_start = 0
        # raw capture of a value's JSON text: (path, start offset, emitted-up-to offset)
        self._capture: tuple[tuple[Any, ...], int, int] | None = None
        self._capture_target: tuple[str, int] | None = None  # ("args", call index) | ("answer", -1)
        self._calls: list[_Call] = []
        self._closed: list[int] = []  # calls whose object closed, not yet taken (take_finished_calls)
        self._content: list[str] = []
        self._answer_is_string = False
        self._events: list[StreamEvent] = []

    # -- public ------------------------------------------------------------------------

    def feed(self, delta: str) -> list[StreamEvent]:
        """Consume the next piece of output; return the events it completes."""
        if self.mode != "tools":
            if delta:
                self._content.append(delta)
                return [ContentDelta(delta)]
            return []
        self._text += delta
        while self._pos < len(self._text):
            ch = self._text[self._pos]
            self._step(ch)
            self._pos += 1
        self._flush_capture()
        events, self._events = self._events, []
        return events

    def finish(self) -> list[StreamEvent]:
        """Call at the end of the output: returns any last events, raises ``ValueError``
        when the JSON stopped before it was complete."""
        if self.mode != "tools":
            return []
        events, self._events = self._events, []
        if not self._ended:
            raise ValueError("the model's output ended before its JSON was complete (truncated)")
        return events

    @property
    def done(self) -> bool:
        """True once the complete top-level JSON value has been read (tools mode)."""
        return self._ended if self.mode == "tools" else False

    @property
    def content(self) -> str | None:
        """The answer text so far (content), or None when there is none."""
        return "".join(self._content) if self._content else None

    @property
    def tool_calls(self) -> list[ToolCall]:
        """The calls whose arguments are complete, with their parsed arguments."""
        out = []
        for c in self._calls:
            if c.name is None or not c.args:
                continue
            try:
                args = json.loads("".join(c.args))
            except json.JSONDecodeError:
                continue  # still streaming
            out.append(ToolCall(id=c.id, name=c.name, arguments=args if isinstance(args, dict) else {}))
        return out

    @property
    def arguments_texts(self) -> list[str]:
        """Each named call's arguments JSON exactly as the model wrote it, in order: the concatenation
        of its `ToolCallArgsDelta` fragments (not re-serialized: ``2.1237107879569874`` stays as written,
        where ``json.loads`` + ``json.dumps`` would give ``2.123710787956987``)."""
        return ["".join(c.args) for c in self._calls if c.name is not None]

    def take_finished_calls(self) -> list[tuple[int, ToolCall]]:
        """The calls whose JSON object closed since the last take, as (index in the turn, call): complete
        while the model may still be writing the next one."""
        out = []
        for index in self._closed:
            c = self._calls[index]
            try:
                args = json.loads("".join(c.args))
            except json.JSONDecodeError:
                continue  # not JSON after all: parse_turn will say why at the end
            if isinstance(args, dict) and c.name is not None:
                out.append((index, ToolCall(id=c.id, name=c.name, arguments=args)))
        self._closed.clear()
        return out

    # -- the scanner -------------------------------------------------------------------

    def _error(self, ch: str) -> ValueError:
        where = self._text[max(0, self._pos - 30) : self._pos + 1]
        return ValueError(f"unexpected {ch!r} at offset {self._pos} in the model's output (…{where!r})")

    def _path(self) -> tuple[Any, ...]:
        return tuple(f.key if f.kind == "obj" else f.index for f in self._stack)

    def _step(self, ch: str) -> None:
        if self._lex == "string":
            self._string_char(ch)
            return
        if self._lex == "scalar":
            if ch in _SCALAR_CHARS:
                return
            self._end_scalar()  # then read ch as the delimiter it is
        if ch in _WS:
            return
        if self._ended:
            raise self._error(ch)
        if not self._stack:
            if self._started:
                raise self._error(ch)
            if ch != "{":
                raise ValueError(f"the model's output must be a JSON object, it starts with {ch!r}")
            self._begin_value(ch)
            return
        top = self._stack[-1]
        if top.kind == "obj":
            if top.state in ("key_or_end", "key") and ch == '"':
                self._lex, self._str_is_key, self._str_buf = "string", True, []
            elif top.state in ("key_or_end", "comma_or_end") and ch == "}":
                self._end_container()
            elif top.state == "colon" and ch == ":":
                top.state = "value"
            elif top.state == "value":
                self._begin_value(ch)
            elif top.state == "comma_or_end" and ch == ",":
                top.state = "key"
            else:
                raise self._error(ch)
        else:
            if top.state in ("value_or_end", "comma_or_end") and ch == "]":
                self._end_container()
            elif top.state in ("value_or_end", "value"):
                top.index += 1
                self._begin_value(ch)
            elif top.state == "comma_or_end" and ch == ",":
                top.state = "value"
            else:
                raise self._error(ch)

    def _begin_value(self, ch: str) -> None:
        """A value starts with ``ch`` at the current offset, at the current path."""
        path = self._path()
        self._started = True
        self._on_value_start(path, ch)
        if ch == "{":
            self._stack.append(_Frame("obj", "key_or_end"))
        elif ch == "[":
            self._stack.append(_Frame("arr", "value_or_end"))
        elif ch == '"':
            self._lex, self._str_is_key, self._str_buf = "string", False, []
        elif ch in _SCALAR_CHARS:
            self._lex, self._scalar_start = "scalar", self._pos
        else:
            raise self._error(ch)

    def _end_container(self) -> None:
        self._stack.pop()
        self._value_ended(end=self._pos + 1)

    def _end_scalar(self) -> None:
        self._lex = None
        raw = self._text[self._scalar_start : self._pos]
        try:
            json.loads(raw)
        except json.JSONDecodeError:
            raise ValueError(f"{raw!r} is not a JSON value (offset {self._scalar_start})") from None
        self._value_ended(end=self._pos)

    def _value_ended(self, end: int) -> None:
        """The value at the current path ended at offset ``end`` (exclusive)."""
        path = self._path()
        self._on_value_end(path, end)
        if not self._stack:
            self._ended = True
            return
        top = self._stack[-1]
        top.state = "comma_or_end"

    def _string_char(self, ch: str) -> None:
        if self._esc is None:
            if ch == '"':
                self._lex = None
                text = "".join(self._str_buf)
                if self._str_is_key:
                    top = self._stack[-1]
                    top.key, top.state = text, "colon"
                else:
                    self._on_string_end(self._path(), text)
                    self._value_ended(end=self._pos + 1)
                return
            if ch == "\\":
                self._esc = "\\"
                return
            self._string_out(ch)
            return
        if self._esc == "\\":
            if ch == "u":
                self._esc = "u"
                return
            if ch not in _ESCAPES:
                raise self._error(ch)
            self._esc = None
            self._string_out(_ESCAPES[ch])
            return
        # \uXXXX
        if ch not in "0123456789abcdefABCDEF":
            raise self._error(ch)
        self._esc += ch
        if len(self._esc) < 5:
            return
        code = int(self._esc[1:], 16)
        self._esc = None
        if 0xD800 <= code < 0xDC00:
            self._high_surrogate = code  # wait for the low half
            return
        if 0xDC00 <= code < 0xE000 and self._high_surrogate is not None:
            code = 0x10000 + ((self._high_surrogate - 0xD800) << 10) + (code - 0xDC00)
        self._high_surrogate = None
        self._string_out(chr(code))

    def _string_out(self, text: str) -> None:
        self._str_buf.append(text)
        if not self._str_is_key and self._path() == ("answer",) and self._answer_is_string:
            self._content.append(text)
            self._events.append(ContentDelta(text))

    # -- what the format means -----------------------------------------------------------

    def _on_value_start(self, path: tuple[Any, ...], ch: str) -> None:
        if path == ("answer",):
            if ch == '"':
                self._answer_is_string = True
            else:  # a structured answer: its JSON text is the content
                self._capture, self._capture_target = (path, self._pos, self._pos), ("answer", -1)
        elif len(path) == 2 and path[0] == "calls":
            if ch != "{":
                raise ValueError(f"each entry of 'calls' must be an object, got {ch!r}")
            self._calls.append(_Call(index=path[1], id=new_call_id()))
        elif len(path) == 3 and path[0] == "calls" and path[2] == "arguments":
            call = self._calls[path[1]]
            call.saw_args = True
            self._capture, self._capture_target = (path, self._pos, self._pos), ("args", path[1])

    def _on_string_end(self, path: tuple[Any, ...], text: str) -> None:
        if len(path) == 3 and path[0] == "calls" and path[2] == "tool":
            call = self._calls[path[1]]
            call.name = text
            self._start_call(call)

    def _on_value_end(self, path: tuple[Any, ...], end: int) -> None:
        if self._capture is not None and self._capture[0] == path:
            self._flush_capture(end)
            self._capture = self._capture_target = None
        if len(path) == 2 and path[0] == "calls":
            call = self._calls[path[1]]
            if call.name is None:
                raise ValueError(f"tool call {path[1]} has no \"tool\" name")
            if not call.saw_args:  # no arguments given: an empty object
                self._args_fragment(call, "{}")
            self._closed.append(call.index)

    def _start_call(self, call: _Call) -> None:
        call.started = True
        self._events.append(ToolCallStart(index=call.index, id=call.id, name=call.name or ""))
        if call.pending:
            self._events.append(ToolCallArgsDelta(index=call.index, json_fragment="".join(call.pending)))
            call.pending.clear()

    def _args_fragment(self, call: _Call, text: str) -> None:
        call.args.append(text)
        if call.started:
            self._events.append(ToolCallArgsDelta(index=call.index, json_fragment=text))
        else:  # "arguments" came before "tool": hold until the name is known
            call.pending.append(text)

    def _flush_capture(self, end: int | None = None) -> None:
        if self._capture is None or self._capture_target is None:
            return
        path, start, emitted = self._capture
        stop = len(self._text) if end is None else end
        if self._lex == "scalar" and end is None:
            stop = self._scalar_start  # a number may still grow; hold it back
        if stop <= emitted:
            return
        text = self._text[emitted:stop]
        self._capture = (path, start, stop)
        kind, index = self._capture_target
        if kind == "answer":
            self._content.append(text)
            self._events.append(ContentDelta(text))
        else:
            self._args_fragment(self._calls[index], text)
