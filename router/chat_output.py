"""A chat choice's generated text as the OpenAI chat API returns it: ``reasoning_content``, ``content``
and ``tool_calls``, whole (`chat_message`) or as stream deltas (`ChatOutputStream`).

The text is split in two steps, each owned by its module: `splitserve.router.reasoning` (thinking mode:
reasoning before ``</think>``) and `splitserve.router.tool_calls` (DSML function-call blocks in the
answer). ``finish_reason`` becomes ``"tool_calls"`` when the generation stopped by itself (EOS or a stop
string) after at least one call, every call whole.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from splitserve.router.reasoning import ReasoningStream, split_reasoning
from splitserve.router.tool_calls import (
    CallArguments,
    CallStart,
    ContentDelta,
    ParsedCall,
    ToolCallStream,
    ToolEvent,
    parse_tool_calls,
)

logger = logging.getLogger(__name__)


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


@dataclass(frozen=True, slots=True)
class ChatOutputOptions:
    """How to read a chat request's output.

    `tools` None: no tool-call parsing (no tools, or ``tool_choice: "none"``); `max_calls` 1 for
    ``parallel_tool_calls: false``.
    """

    thinking: bool = False
    tools: tuple[Mapping[str, Any], ...] | None = None
    max_calls: int | None = None


def _finish_reason(raw: str | None, num_calls: int, all_closed: bool) -> str | None:
    """``tool_calls`` when the model stopped by itself after calls that are all whole (a stop string can
    cut one short)."""
    return "tool_calls" if raw == "stop" and num_calls and all_closed else raw


def _tool_call(index: int, call_id: str, name: str, arguments: str) -> dict[str, Any]:
    return {"index": index, "id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def chat_message(
    text: str,
    finish_reason: str | None,
    options: ChatOutputOptions,
    call_id: Callable[[], str] = new_call_id,
) -> tuple[dict[str, Any], str | None]:
    """The ``message`` of a finished choice and its ``finish_reason``.

    The parsers do not raise on any text (property-tested); should one fail anyway, the text comes back
    as plain content rather than as a 500.
    """
    try:
        return _chat_message(text, finish_reason, options, call_id)
    except Exception:
        logger.exception("parsing the model output failed; returning it as plain content")
        return {"role": "assistant", "content": text}, finish_reason


def _chat_message(
    text: str, finish_reason: str | None, options: ChatOutputOptions, call_id: Callable[[], str]
) -> tuple[dict[str, Any], str | None]:
    reasoning, content = split_reasoning(text, options.thinking)
    message: dict[str, Any] = {"role": "assistant"}
    if reasoning is not None:
        message["reasoning_content"] = reasoning
    calls: list[dict[str, Any]] = []
    parsed_calls: list[ParsedCall] = []
    if options.tools is not None:
        parsed = parse_tool_calls(content, options.tools, options.max_calls)
        content, parsed_calls = parsed.content, parsed.calls
        for c in parsed_calls:
            call = _tool_call(len(calls), call_id(), c.name, c.arguments)
            del call["index"]  # the non-streaming form has no index
            calls.append(call)
    message["content"] = content if content or not calls else None
    if calls:
        message["tool_calls"] = calls
    return message, _finish_reason(finish_reason, len(calls), all(c.complete for c in parsed_calls))


class ChatOutputStream:
    """Per choice: turns text deltas into OpenAI ``delta`` objects (several per feed, in order)."""

    def __init__(self, options: ChatOutputOptions, call_id: Callable[[], str] = new_call_id) -> None:
        self._reasoning = ReasoningStream(options.thinking)
        self._tools = ToolCallStream(options.tools, options.max_calls) if options.tools is not None else None
        self._call_id = call_id
        self._failed = False

    @property
    def num_calls(self) -> int:
        return self._tools.num_calls if self._tools is not None else 0

    def feed(self, text: str) -> list[dict[str, Any]]:
        if self._failed:
            return [{"content": text}] if text else []
        try:
            d = self._reasoning.feed(text)
            return self._deltas(d.reasoning, self._content_events(d.content, final=False))
        except Exception:
            return self._fail(text)

    def finish(self) -> list[dict[str, Any]]:
        if self._failed:
            return []
        try:
            d = self._reasoning.finish()
            return self._deltas(d.reasoning, self._content_events("", final=True))
        except Exception:
            return self._fail("")

    def _fail(self, text: str) -> list[dict[str, Any]]:
        """Should a parser fail (it does not on any text, property-tested), the rest streams as content."""
        logger.exception("parsing the model output failed; streaming the rest as plain content")
        self._failed = True
        return [{"content": text}] if text else []

    def finish_reason(self, raw: str | None) -> str | None:
        closed = self._tools.num_closed if self._tools is not None else 0
        return _finish_reason(raw, self.num_calls, closed == self.num_calls)

    def _content_events(self, content: str, final: bool) -> Sequence[ToolEvent]:
        if self._tools is None:
            return [ContentDelta(content)] if content else []
        events = self._tools.feed(content) if content else []
        return events + self._tools.finish() if final else events

    def _deltas(self, reasoning: str, events: Sequence[ToolEvent]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        if reasoning:
            out.append({"reasoning_content": reasoning})
        for ev in events:
            last = out[-1] if out else None
            if isinstance(ev, ContentDelta):
                if last is not None and "content" in last:
                    last["content"] += ev.text
                elif ev.text:
                    out.append({"content": ev.text})
            elif isinstance(ev, CallStart):
                out.append({"tool_calls": [_tool_call(ev.index, self._call_id(), ev.name, "")]})
            elif isinstance(ev, CallArguments):
                prev = last["tool_calls"][0] if last is not None and "tool_calls" in last else None
                if prev is not None and prev["index"] == ev.index and "id" not in prev:
                    prev["function"]["arguments"] += ev.fragment
                else:
                    out.append({"tool_calls": [{"index": ev.index, "function": {"arguments": ev.fragment}}]})
        return out
