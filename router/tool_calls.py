"""Parsing DeepSeek-V3.2's DSML function-call blocks out of the model's answer text.

The format (spec §12.2; what `splitserve.router.chat.render_tool_calls` writes)::

    ...answer text\\n\\n<｜DSML｜function_calls>
    <｜DSML｜invoke name="NAME">
    <｜DSML｜parameter name="KEY" string="true|false">VALUE</｜DSML｜parameter>
    </｜DSML｜invoke>
    </｜DSML｜function_calls>

``string="true"``: VALUE is the raw string; ``"false"``: VALUE is JSON. The tool's JSON schema settles
disagreements: a parameter whose schema type excludes strings is read as JSON even if marked
``string="true"`` (when its text is JSON of an allowed type), and one whose schema type is only
``string`` keeps the raw text even if marked ``string="false"``. A ``string="false"`` value that is not
JSON is kept as a string. ``arguments`` is always ``json.dumps`` of the arguments object (``", "`` and
``": "`` separators), written in the order of the parameters.

Rules for text that is not a well-formed block (nothing ever raises):

* whitespace between tags is allowed; the ``"\\n\\n"`` before ``<｜DSML｜function_calls>`` is not content;
  names are 1 to 256 characters other than ``"<>`` and newline (anything else is not a tag);
* a block that goes wrong before its first ``invoke`` tag is complete is plain content, unchanged;
* a block that goes wrong later keeps the calls read so far (a call in progress is closed with the
  parameters it has), and the text from the first unexpected character on is content again;
* text after ``</｜DSML｜function_calls>`` is content (and may open another block);
* a text that ends inside a block (max_tokens) leaves the last call as far as it got: its arguments may
  be incomplete JSON, as OpenAI's are when a generation is cut;
* with ``max_calls`` (``parallel_tool_calls: false``), invokes beyond it are read and dropped.

`parse_tool_calls` parses a whole text; `ToolCallStream` parses it incrementally (content deltas, a call's
name as soon as its ``invoke`` tag is complete, its arguments as each parameter arrives and string values
as they are written), holding back only what could still become a tag. For every split of a text into
chunks the stream's events add up to `parse_tool_calls`' result (property-tested).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from splitserve.model.tokenizer import DSML_TOKEN
from splitserve.router.reasoning import partial_suffix

BLOCK_OPEN = f"<{DSML_TOKEN}function_calls>"
BLOCK_CLOSE = f"</{DSML_TOKEN}function_calls>"
INVOKE_OPEN = f'<{DSML_TOKEN}invoke name="'
INVOKE_CLOSE = f"</{DSML_TOKEN}invoke>"
PARAM_OPEN = f'<{DSML_TOKEN}parameter name="'
PARAM_CLOSE = f"</{DSML_TOKEN}parameter>"
_BLOCK_LEAD = "\n\n"  # the encoder's separator between the answer and the block
_WS = " \t\r\n"
_NAME_STOP = frozenset('"<>\n')
MAX_NAME_LEN = 256  # a longer function or parameter name is not a tag (and bounds the look-ahead)

# Element templates: literal strings, _NAME (one or more characters outside _NAME_STOP) or _BOOL.
_NAME = object()
_BOOL = object()
_INVOKE_TAG = (INVOKE_OPEN, _NAME, '">')
_PARAM_TAG = (PARAM_OPEN, _NAME, '" string="', _BOOL, '">')


def _match(s: str, pos: int, template: Sequence[object]) -> tuple[str, list[str], int]:
    """Matches `template` at s[pos:]: ("full", fields, end) | ("partial", [], 0) | ("fail", [], 0)."""
    fields: list[str] = []
    for part in template:
        if part is _NAME:
            start = pos
            while pos < len(s) and s[pos] not in _NAME_STOP and pos - start <= MAX_NAME_LEN:
                pos += 1
            if pos - start > MAX_NAME_LEN:
                return "fail", [], 0
            if pos == len(s):
                return "partial", [], 0
            if pos == start:
                return "fail", [], 0
            fields.append(s[start:pos])
        elif part is _BOOL:
            rest = s[pos : pos + 5]
            for word in ("true", "false"):
                if rest.startswith(word):
                    fields.append(word)
                    pos += len(word)
                    break
            else:
                if any(w.startswith(rest) for w in ("true", "false")) and pos + len(rest) == len(s):
                    return "partial", [], 0
                return "fail", [], 0
        else:
            assert isinstance(part, str)
            got = s[pos : pos + len(part)]
            if got != part:
                if part.startswith(got) and pos + len(got) == len(s):
                    return "partial", [], 0
                return "fail", [], 0
            pos += len(part)
    return "full", fields, pos


@dataclass(frozen=True, slots=True)
class _Element:
    """What starts at a structural position inside a block."""

    kind: str  # "need" (could still become a tag), "bad", "invoke", "block_end", "param", "invoke_end"
    end: int = 0
    name: str = ""
    is_str: bool = False


def _element(s: str, pos: int, in_invoke: bool, seen_keys: set[str]) -> _Element:
    """The element at s[pos:] after optional whitespace, inside an invoke or between invokes."""
    while pos < len(s) and s[pos] in _WS:
        pos += 1
    if pos == len(s):
        return _Element("need")
    if in_invoke:
        options: list[tuple[str, Sequence[object]]] = [("param", _PARAM_TAG), ("invoke_end", (INVOKE_CLOSE,))]
    else:
        options = [("invoke", _INVOKE_TAG), ("block_end", (BLOCK_CLOSE,))]
    partial = False
    for kind, template in options:
        status, fields, end = _match(s, pos, template)
        if status == "full":
            if kind == "param":
                if fields[0] in seen_keys:
                    return _Element("bad")  # duplicate parameter
                return _Element(kind, end, fields[0], fields[1] == "true")
            return _Element(kind, end, fields[0] if fields else "")
        partial = partial or status == "partial"
    return _Element("need" if partial else "bad")


# --------------------------------------------------------------------------------------------------
# Parameter typing


def _schema_types(schema: Any) -> frozenset[str] | None:
    """The JSON types a parameter schema allows (None: unknown, anything goes)."""
    if not isinstance(schema, Mapping):
        return None
    t = schema.get("type")
    if isinstance(t, str):
        return frozenset({t})
    if isinstance(t, list) and all(isinstance(x, str) for x in t):
        return frozenset(t)
    for key in ("anyOf", "oneOf"):
        options = schema.get(key)
        if isinstance(options, list):
            out: set[str] = set()
            for o in options:
                ot = _schema_types(o)
                if ot is None:
                    return None
                out |= ot
            return frozenset(out)
    if isinstance(schema.get("enum"), list):
        return frozenset(_json_type(v) for v in schema["enum"])
    return None


def _json_type(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, int):
        return "integer"
    if isinstance(v, float):
        return "number"
    if isinstance(v, str):
        return "string"
    if isinstance(v, list):
        return "array"
    return "object"


def _allowed(v: Any, types: frozenset[str]) -> bool:
    t = _json_type(v)
    return t in types or (t == "integer" and "number" in types)


def _reject_constant(name: str) -> Any:
    raise ValueError(name)  # NaN / Infinity are not JSON


def _loads(raw: str) -> tuple[bool, Any]:
    try:
        return True, json.loads(raw, parse_constant=_reject_constant)
    except ValueError:
        return False, None


def value_json(raw: str, is_str: bool, types: frozenset[str] | None) -> str:
    """The JSON text of one parameter value (see the module docstring for the rules)."""
    if is_str:
        if types is not None and "string" not in types:
            ok, v = _loads(raw)
            if ok and _allowed(v, types):
                return _dumps(v)
        return _dumps(raw)
    ok, v = _loads(raw)
    if not ok or (types == frozenset({"string"}) and not isinstance(v, str)):
        return _dumps(raw)
    return _dumps(v)


def _streams_as_string(is_str: bool, types: frozenset[str] | None) -> bool:
    """Whether a value is certain to be the raw string, so that it can be streamed as it is written."""
    return is_str and (types is None or "string" in types)


def _dumps(v: Any) -> str:
    return json.dumps(v, ensure_ascii=False)


def _escape(chunk: str) -> str:
    return _dumps(chunk)[1:-1]


class ToolSchemas:
    """Parameter types per function name, from OpenAI-format tools."""

    def __init__(self, tools: Sequence[Mapping[str, Any]] | None = None) -> None:
        self._params: dict[str, dict[str, Any]] = {}
        for tool in tools or ():
            fn = tool.get("function") if isinstance(tool, Mapping) else None
            if isinstance(fn, Mapping) and isinstance(fn.get("name"), str):
                params = fn.get("parameters")
                props = params.get("properties") if isinstance(params, Mapping) else None
                self._params[fn["name"]] = dict(props) if isinstance(props, Mapping) else {}

    def types(self, function: str, parameter: str) -> frozenset[str] | None:
        return _schema_types(self._params.get(function, {}).get(parameter))


# --------------------------------------------------------------------------------------------------
# Results and events


@dataclass(slots=True)
class ParsedCall:
    name: str
    arguments: str = ""

    @property
    def complete(self) -> bool:
        """Its arguments are a whole JSON object (False for a call cut short)."""
        return _is_object(self.arguments)


@dataclass(slots=True)
class ParsedToolOutput:
    content: str
    calls: list[ParsedCall] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class ContentDelta:
    text: str


@dataclass(frozen=True, slots=True)
class CallStart:
    index: int
    name: str


@dataclass(frozen=True, slots=True)
class CallArguments:
    index: int
    fragment: str


ToolEvent = ContentDelta | CallStart | CallArguments


def _param_prefix(first: bool, key: str) -> str:
    return ("{" if first else ", ") + _dumps(key) + ": "


def _close_args(num_params: int) -> str:
    return "}" if num_params else "{}"


# --------------------------------------------------------------------------------------------------
# One-shot


def parse_tool_calls(
    text: str, tools: Sequence[Mapping[str, Any]] | None = None, max_calls: int | None = None
) -> ParsedToolOutput:
    """Content and calls of a whole answer text (never raises)."""
    schemas = ToolSchemas(tools)
    content: list[str] = []
    calls: list[ParsedCall] = []
    n_invokes = 0
    pos = 0
    while True:
        p = text.find(BLOCK_OPEN, pos)
        if p < 0:
            content.append(text[pos:])
            break
        pre = text[pos:p]
        lead = _BLOCK_LEAD if pre.endswith(_BLOCK_LEAD) else ""
        content.append(pre[: len(pre) - len(lead)])
        q = p + len(BLOCK_OPEN)
        started = False
        call: ParsedCall | None = None  # the invoke being read (None between invokes or when dropped)
        in_invoke = False
        keys: set[str] = set()
        fn = ""
        resume: int | None = None  # where content resumes after the block
        while True:
            el = _element(text, q, in_invoke, keys)
            if el.kind == "need":  # the text ends inside the block
                if not started:
                    content.append(lead + BLOCK_OPEN + text[q:])
                break
            if el.kind == "bad":
                if not started:
                    content.append(lead + BLOCK_OPEN)
                elif call is not None and in_invoke:
                    call.arguments += _close_args(len(keys))
                resume = q
                break
            q = el.end
            if el.kind == "invoke":
                started, in_invoke, keys, fn = True, True, set(), el.name
                call = ParsedCall(el.name) if max_calls is None or n_invokes < max_calls else None
                n_invokes += 1
                if call is not None:
                    calls.append(call)
            elif el.kind == "invoke_end":
                if call is not None:
                    call.arguments += _close_args(len(keys))
                in_invoke, call = False, None
            elif el.kind == "block_end":
                resume = q
                break
            else:  # a parameter: its value runs to the closing tag (or the end of the text)
                types = schemas.types(fn, el.name)
                r = text.find(PARAM_CLOSE, q)
                raw = text[q:] if r < 0 else text[q:r]
                if call is not None:
                    call.arguments += _param_prefix(not keys, el.name)
                    if _streams_as_string(el.is_str, types):
                        call.arguments += '"' + _escape(raw) + ('"' if r >= 0 else "")
                    elif r >= 0:
                        call.arguments += value_json(raw, el.is_str, types)
                keys.add(el.name)
                if r < 0:
                    break
                q = r + len(PARAM_CLOSE)
        if resume is None:
            break
        pos = resume
    return ParsedToolOutput("".join(content), calls)


# --------------------------------------------------------------------------------------------------
# Streaming


class ToolCallStream:
    """Incremental `parse_tool_calls`: ``feed`` text deltas, then ``finish`` once; both return events."""

    def __init__(self, tools: Sequence[Mapping[str, Any]] | None = None, max_calls: int | None = None) -> None:
        self._schemas = ToolSchemas(tools)
        self._max_calls = max_calls
        self._buf = ""
        self._state = "content"  # content | block | value
        self._lead = ""
        self._started = False
        self._in_invoke = False
        self._keys: set[str] = set()
        self._fn = ""
        self._emit_call = False  # the current invoke is reported (not beyond max_calls)
        self._n_invokes = 0
        self.num_calls = 0  # calls reported so far
        self.num_closed = 0  # of which with their arguments object closed
        self._value_stream = False
        self._value_is_str = False
        self._value_types: frozenset[str] | None = None
        self._scanned = 0  # how far a whole (non-streamed) value has been searched for its closing tag
        self._ws: list[str] = []  # whitespace before the next element, kept until the element is known

    def feed(self, text: str) -> list[ToolEvent]:
        self._buf += text
        out: list[ToolEvent] = []
        while self._step(out):
            pass
        return out

    def finish(self) -> list[ToolEvent]:
        out: list[ToolEvent] = []
        buf, self._buf = self._buf, ""
        if self._state == "content":
            if buf:
                out.append(ContentDelta(buf))
        elif self._state == "block":
            if not self._started:
                out.append(ContentDelta(self._lead + BLOCK_OPEN + "".join(self._ws) + buf))
        elif self._value_stream and self._emit_call and buf:  # a string value cut short
            out.append(CallArguments(self._call_index, _escape(buf)))
        self._state = "done"
        return out

    @property
    def _call_index(self) -> int:
        return self.num_calls - 1

    def _args(self, out: list[ToolEvent], fragment: str) -> None:
        if self._emit_call and fragment:
            out.append(CallArguments(self._call_index, fragment))

    def _close_call(self, out: list[ToolEvent]) -> None:
        self._args(out, _close_args(len(self._keys)))
        if self._emit_call:
            self.num_closed += 1

    def _step(self, out: list[ToolEvent]) -> bool:
        """Consumes what it can from the buffer; False when it needs more text."""
        buf = self._buf
        if self._state == "content":
            p = buf.find(BLOCK_OPEN)
            if p < 0:
                keep = max(partial_suffix(buf, _BLOCK_LEAD + BLOCK_OPEN), partial_suffix(buf, BLOCK_OPEN))
                if len(buf) > keep:
                    out.append(ContentDelta(buf[: len(buf) - keep]))
                    self._buf = buf[len(buf) - keep :]
                return False
            pre = buf[:p]
            self._lead = _BLOCK_LEAD if pre.endswith(_BLOCK_LEAD) else ""
            if len(pre) > len(self._lead):
                out.append(ContentDelta(pre[: len(pre) - len(self._lead)]))
            self._buf = buf[p + len(BLOCK_OPEN) :]
            self._state, self._started, self._in_invoke = "block", False, False
            return True
        if self._state == "value":
            if self._value_stream:
                r = buf.find(PARAM_CLOSE)  # the buffer holds only what was not sent yet
                if r < 0:
                    keep = partial_suffix(buf, PARAM_CLOSE)
                    self._args(out, _escape(buf[: len(buf) - keep]))
                    self._buf = buf[len(buf) - keep :]
                    return False
                self._args(out, _escape(buf[:r]) + '"')
            else:
                r = buf.find(PARAM_CLOSE, self._scanned)
                if r < 0:
                    self._scanned = max(0, len(buf) - len(PARAM_CLOSE) + 1)
                    return False
                self._args(out, value_json(buf[:r], self._value_is_str, self._value_types))
            self._buf = buf[r + len(PARAM_CLOSE) :]
            self._state = "block"
            return True
        if self._state != "block":
            return False
        stripped = buf.lstrip(_WS)
        if len(stripped) < len(buf):  # set whitespace aside: a long run is not scanned again and again
            self._ws.append(buf[: len(buf) - len(stripped)])
            self._buf = buf = stripped
        el = _element(buf, 0, self._in_invoke, self._keys)
        if el.kind == "need":
            return False
        ws, self._ws = "".join(self._ws), []
        if el.kind == "bad":
            self._buf = ws + buf  # content resumes at the whitespace, as in parse_tool_calls
            if not self._started:
                out.append(ContentDelta(self._lead + BLOCK_OPEN))
            elif self._in_invoke:
                self._close_call(out)
            self._state = "content"
            return True
        self._buf = buf[el.end :]
        if el.kind == "invoke":
            self._started, self._in_invoke, self._keys, self._fn = True, True, set(), el.name
            self._emit_call = self._max_calls is None or self._n_invokes < self._max_calls
            self._n_invokes += 1
            if self._emit_call:
                self.num_calls += 1
                out.append(CallStart(self._call_index, el.name))
        elif el.kind == "invoke_end":
            self._close_call(out)
            self._in_invoke = False
        elif el.kind == "block_end":
            self._state = "content"
        else:
            types = self._schemas.types(self._fn, el.name)
            self._value_stream = _streams_as_string(el.is_str, types)
            self._value_is_str, self._value_types = el.is_str, types
            self._args(out, _param_prefix(not self._keys, el.name) + ('"' if self._value_stream else ""))
            self._keys.add(el.name)
            self._state, self._scanned = "value", 0
        return True


def collect(events: Sequence[ToolEvent]) -> ParsedToolOutput:
    """Folds stream events into the one-shot result's shape (for tests and for the non-stream path)."""
    content: list[str] = []
    calls: list[ParsedCall] = []
    for ev in events:
        if isinstance(ev, ContentDelta):
            content.append(ev.text)
        elif isinstance(ev, CallStart):
            assert ev.index == len(calls)
            calls.append(ParsedCall(ev.name))
        else:
            calls[ev.index].arguments += ev.fragment
    return ParsedToolOutput("".join(content), calls)


def _is_object(s: str) -> bool:
    ok, v = _loads(s)
    return ok and isinstance(v, dict)
