"""The output parsers (reasoning, DSML tool calls, the chat message built from both).

References: DeepSeek's gold encoding example (the text the model is trained to write for known messages),
the chat encoder (round trips: encode an assistant message, parse its text back), and invariants (the
streaming parsers give the one-shot result for every split of the text; arguments are JSON objects).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from splitserve.router.chat import encode_messages, render_tool_calls
from splitserve.router.chat_output import ChatOutputOptions, ChatOutputStream, chat_message
from splitserve.router.reasoning import ReasoningStream, split_reasoning
from splitserve.router.tool_calls import (
    BLOCK_CLOSE,
    BLOCK_OPEN,
    INVOKE_CLOSE,
    INVOKE_OPEN,
    MAX_NAME_LEN,
    PARAM_CLOSE,
    PARAM_OPEN,
    ToolCallStream,
    collect,
    parse_tool_calls,
    value_json,
)

EOS = "<｜end▁of▁sentence｜>"
A = "<｜Assistant｜>"
EXAMPLE = json.loads((Path(__file__).parent / "data" / "dsv32_encoding_example.json").read_text(encoding="utf-8"))
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _chunks(text: str, cuts: list[int]) -> list[str]:
    points = sorted({c % (len(text) + 1) for c in cuts})
    bounds = [0, *points, len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


def _stream_tools(chunks: list[str], tools: Any = None, max_calls: int | None = None):  # noqa: ANN202
    s = ToolCallStream(tools, max_calls)
    events = [ev for c in chunks for ev in s.feed(c)]
    return collect(events + s.finish())


def _stream_message(chunks: list[str], options: ChatOutputOptions, finish: str) -> tuple[dict[str, Any], str]:
    """Folds ChatOutputStream deltas into a message the way an OpenAI client accumulates them."""
    s = ChatOutputStream(options, call_id=lambda: "id")
    deltas = [d for c in chunks for d in s.feed(c)] + s.finish()
    msg: dict[str, Any] = {"role": "assistant"}
    if options.thinking:
        msg["reasoning_content"] = ""
    content = ""
    calls: list[dict[str, Any]] = []
    for d in deltas:
        assert len(d) == 1, d
        if "reasoning_content" in d:
            msg["reasoning_content"] += d["reasoning_content"]
        elif "content" in d:
            content += d["content"]
        else:
            (tc,) = d["tool_calls"]
            if "id" in tc:  # the first delta of a call: index, id, type and name
                assert tc["index"] == len(calls) and tc["type"] == "function"
                calls.append({"id": tc["id"], "type": "function", "function": dict(tc["function"])})
            else:
                assert set(tc) == {"index", "function"} and set(tc["function"]) == {"arguments"}
                calls[tc["index"]]["function"]["arguments"] += tc["function"]["arguments"]
    msg["content"] = content if content or not calls else None
    if calls:
        msg["tool_calls"] = calls
    return msg, s.finish_reason(finish) or ""


# --------------------------------------------------------------------------------------------------
# DeepSeek's gold example: the assistant turns it encodes are model output the parser must read back


def _gold_turns() -> list[tuple[str, dict[str, Any]]]:
    """(the text the model wrote, the message) for each assistant turn of the example that has tool calls.

    The example is encoded in thinking mode with drop_thinking: turns before the last user message show
    ``</think>`` + content + calls (what non-thinking output looks like); the last turn shows reasoning.
    """
    text: str = EXAMPLE["expected"]
    turns = []
    pos = 0
    for m in EXAMPLE["messages"]:
        if m["role"] != "assistant":
            continue
        end = text.index(EOS, pos)
        start = max(text.rfind("</think>", 0, end), text.rfind("<think>", 0, end))
        if m.get("tool_calls"):
            if text[start:].startswith("<think>"):  # the last turn: reasoning is kept
                turns.append((text[start + len("<think>") : end], m))
            else:
                turns.append((text[start + len("</think>") : end], {**m, "reasoning_content": None}))
        pos = end + len(EOS)
    return turns


def test_gold_example_tool_calls_parse_back() -> None:
    turns = _gold_turns()
    assert len(turns) == 3
    for text, m in turns:
        thinking = m["reasoning_content"] is not None
        msg, finish = chat_message(text, "stop", ChatOutputOptions(thinking, tuple(EXAMPLE["tools"])))
        assert finish == "tool_calls"
        assert msg.get("reasoning_content") == m["reasoning_content"]
        assert msg["content"] is None
        got = [(c["function"]["name"], c["function"]["arguments"]) for c in msg["tool_calls"]]
        assert got == [(c["function"]["name"], c["function"]["arguments"]) for c in m["tool_calls"]]
        assert len({c["id"] for c in msg["tool_calls"]}) == len(got)


@pytest.mark.parametrize("tokens_split", [1, 3, 7])
def test_gold_example_streams_like_one_shot(tokens_split: int) -> None:
    for text, m in _gold_turns():
        options = ChatOutputOptions(m["reasoning_content"] is not None, tuple(EXAMPLE["tools"]))
        chunks = [text[i : i + tokens_split] for i in range(0, len(text), tokens_split)]
        assert _stream_message(chunks, options, "stop") == chat_message(text, "stop", options, call_id=lambda: "id")


# --------------------------------------------------------------------------------------------------
# Reasoning


def test_reasoning_split() -> None:
    assert split_reasoning("a</think>b</think>c", True) == ("a", "b</think>c")
    assert split_reasoning("cut short", True) == ("cut short", "")
    assert split_reasoning("a</think>b", False) == (None, "a</think>b")


@SETTINGS
@given(st.text(alphabet="ab</think>\n", max_size=40), st.lists(st.integers(0, 60), max_size=8), st.booleans())
def test_reasoning_stream_equals_split(text: str, cuts: list[int], thinking: bool) -> None:
    s = ReasoningStream(thinking)
    reasoning = content = ""
    for chunk in [*_chunks(text, cuts)]:
        d = s.feed(chunk)
        reasoning += d.reasoning
        content += d.content
    d = s.finish()
    reasoning += d.reasoning
    content += d.content
    r, c = split_reasoning(text, thinking)
    assert (reasoning if thinking else None, content) == (r, c)


# --------------------------------------------------------------------------------------------------
# Tool calls: exact texts


def _block(*invokes: str) -> str:
    return "\n\n" + BLOCK_OPEN + "\n" + "\n".join(invokes) + "\n" + BLOCK_CLOSE


def _invoke(name: str, *params: tuple[str, str, str]) -> str:
    body = "".join(f'{PARAM_OPEN}{k}" string="{s}">{v}{PARAM_CLOSE}\n' for k, s, v in params)
    return f'{INVOKE_OPEN}{name}">\n{body}{INVOKE_CLOSE}'


WEATHER = {
    "type": "function",
    "function": {
        "name": "w",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "days": {"type": "integer"},
                "units": {"enum": ["c", "f"]},
                "tags": {"type": "array"},
            },
        },
    },
}


def test_typing_by_attribute_and_schema() -> None:
    text = _block(
        _invoke(
            "w",
            ("city", "true", "Paris"),
            ("days", "true", "3"),
            ("units", "false", "c"),
            ("tags", "false", '["a", 1]'),
        )
    )
    out = parse_tool_calls(text, [WEATHER])
    assert out.content == "" and len(out.calls) == 1
    # days: marked string but the schema says integer; units: "c" is not JSON, kept as the string
    assert json.loads(out.calls[0].arguments) == {"city": "Paris", "days": 3, "units": "c", "tags": ["a", 1]}
    # without a schema the attribute alone decides
    assert json.loads(parse_tool_calls(text).calls[0].arguments)["days"] == "3"
    # a string-only schema keeps a string="false" value as its text
    assert value_json("12", False, frozenset({"string"})) == '"12"'
    assert value_json("NaN", False, None) == '"NaN"'  # not JSON: kept as a string


_DUP = _block(_invoke("f", ("a", "true", "1"), ("a", "true", "2")))
_P2 = PARAM_OPEN + 'a" string="true">2' + PARAM_CLOSE


@pytest.mark.parametrize(
    ("text", "content", "calls"),
    [
        # no block at all, text that merely mentions the tag
        ("use <｜DSML｜function_calls", "use <｜DSML｜function_calls", []),
        # junk right after the opening tag: everything is content, unchanged
        ("hi\n\n" + BLOCK_OPEN + "\njunk", "hi\n\n" + BLOCK_OPEN + "\njunk", []),
        # a bad tag after a complete call: the call stays, the rest is content
        (
            "x" + _block(_invoke("f", ("a", "false", "1"))).replace(BLOCK_CLOSE, PARAM_OPEN + 'b" string="maybe">2'),
            "x\n" + PARAM_OPEN + 'b" string="maybe">2',
            [("f", '{"a": 1}')],
        ),
        # junk inside an invoke closes the call with what it has
        (
            "x\n\n"
            + BLOCK_OPEN
            + "\n"
            + INVOKE_OPEN
            + 'f">\n'
            + PARAM_OPEN
            + 'a" string="true">v'
            + PARAM_CLOSE
            + "\nOOPS",
            "x\nOOPS",
            [("f", '{"a": "v"}')],
        ),
        # duplicate parameter: the call ends before it; the rest is content
        (_DUP, "\n" + _P2 + "\n" + INVOKE_CLOSE + "\n" + BLOCK_CLOSE, [("f", '{"a": "1"}')]),
        # cut short (max_tokens) inside a string value: the call as far as it got
        (
            "\n\n" + BLOCK_OPEN + "\n" + INVOKE_OPEN + 'f">\n' + PARAM_OPEN + 'a" string="true">par',
            "",
            [("f", '{"a": "par')],
        ),
        # cut short before the first invoke tag is complete: plain content
        ("ok\n\n" + BLOCK_OPEN + "\n" + INVOKE_OPEN + "ge", "ok\n\n" + BLOCK_OPEN + "\n" + INVOKE_OPEN + "ge", []),
        # text after the block, and a second block
        (_block(_invoke("f")) + " after" + _block(_invoke("g")), " after", [("f", "{}"), ("g", "{}")]),
        # lenient whitespace and a block without the blank line before it
        ("a " + BLOCK_OPEN + INVOKE_OPEN + 'f">  ' + INVOKE_CLOSE + "\t" + BLOCK_CLOSE, "a ", [("f", "{}")]),
    ],
)
def test_malformed_and_edge_cases(text: str, content: str, calls: list[tuple[str, str]]) -> None:
    out = parse_tool_calls(text)
    assert out.content == content
    assert [(c.name, c.arguments) for c in out.calls] == calls
    for k in range(len(text) + 1):  # every two-chunk split streams to the same result
        assert _stream_tools([text[:k], text[k:]]) == out


def test_names_are_bounded() -> None:
    ok = "n" * MAX_NAME_LEN
    out = parse_tool_calls(_block(_invoke(ok)))
    assert [c.name for c in out.calls] == [ok]
    long = _block(_invoke(ok + "n"))
    assert parse_tool_calls(long).content == long
    for text in (_block(_invoke(ok)), long):
        for k in range(0, len(text) + 1, 7):
            assert _stream_tools([text[:k], text[k:]]) == parse_tool_calls(text)


def test_max_calls_keeps_the_first() -> None:
    text = _block(_invoke("f", ("a", "true", "1")), _invoke("g", ("b", "true", "2")))
    out = parse_tool_calls(text, max_calls=1)
    assert [(c.name, c.arguments) for c in out.calls] == [("f", '{"a": "1"}')] and out.content == ""
    assert _stream_tools(list(text), max_calls=1) == out


# --------------------------------------------------------------------------------------------------
# Tool calls: properties


_NAMES = st.text(alphabet="abcxyz_0189-.", min_size=1, max_size=8)
_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(10**6), 10**6)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(alphabet=st.characters(exclude_characters="\x00"), max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_NAMES, inner, max_size=3),
    max_leaves=6,
)
_ARGS = st.dictionaries(_NAMES, _VALUES, max_size=4)
_TEXT = st.text(alphabet=st.characters(exclude_characters="\x00"), max_size=20).filter(
    lambda t: "</think>" not in t and "｜DSML｜" not in t
)


@SETTINGS
@given(
    reasoning=_TEXT,
    content=_TEXT,
    calls=st.lists(st.tuples(_NAMES, _ARGS), max_size=3),
    thinking=st.booleans(),
    cuts=st.lists(st.integers(0, 2000), max_size=12),
)
def test_encoder_round_trip_and_stream(
    reasoning: str, content: str, calls: list[tuple[str, dict]], thinking: bool, cuts: list[int]
) -> None:
    """An assistant message the encoder writes parses back to the same message, whole or streamed."""
    assume(not thinking or reasoning or calls)  # DeepSeek's encoder refuses a thinking turn with neither
    tool_calls = [
        {"id": "id", "type": "function", "function": {"name": n, "arguments": json.dumps(a, ensure_ascii=False)}}
        for n, a in calls
    ]
    user = {"role": "user", "content": "q"}
    msg: dict[str, Any] = {"role": "assistant", "content": content or (None if tool_calls else "")}
    if thinking:
        msg["reasoning_content"] = reasoning
    if tool_calls:
        msg["tool_calls"] = tool_calls
    prompt = encode_messages([user], thinking=thinking)
    full = encode_messages([user, msg], thinking=thinking)
    assert full.startswith(prompt) and full.endswith(EOS)
    text = full[len(prompt) : -len(EOS)]  # what the model wrote (the router drops the EOS token)
    options = ChatOutputOptions(thinking, tools=())
    parsed, finish = chat_message(text, "stop", options, call_id=lambda: "id")
    assert parsed == msg
    assert finish == ("tool_calls" if tool_calls else "stop")
    assert _stream_message(_chunks(text, cuts), options, "stop") == (parsed, finish)
    # and the parsed message encodes to the same text
    assert encode_messages([user, parsed], thinking=thinking) == full


_PIECES = [
    "\n",
    "\n\n",
    " ",
    "x",
    "é",
    '"',
    ">",
    "<",
    "true",
    "false",
    "1",
    '{"k": 2}',
    BLOCK_OPEN,
    BLOCK_CLOSE,
    INVOKE_OPEN,
    INVOKE_CLOSE,
    PARAM_OPEN,
    PARAM_CLOSE,
    '">',
    '" string="',
    "｜DSML｜",
    "f",
    "a",
]


@SETTINGS
@given(
    st.lists(st.sampled_from(_PIECES), max_size=30),
    st.lists(st.integers(0, 500), max_size=10),
    st.sampled_from([None, 1]),
)
def test_any_text_parses_and_streams_identically(pieces: list[str], cuts: list[int], max_calls: int | None) -> None:
    """Arbitrary tag soup: never raises, every split streams to the one-shot result, and every call that
    was closed has a JSON object as arguments (written with json.dumps' separators)."""
    text = "".join(pieces)
    out = parse_tool_calls(text, [WEATHER], max_calls)
    assert _stream_tools(_chunks(text, cuts), [WEATHER], max_calls) == out
    for c in out.calls:
        if c.complete:
            assert json.dumps(json.loads(c.arguments), ensure_ascii=False) == c.arguments
    if max_calls is not None:
        assert len(out.calls) <= max_calls
    if BLOCK_OPEN not in text:
        assert out.content == text and not out.calls
    options = ChatOutputOptions(tools=(WEATHER,), max_calls=max_calls)
    for finish in ("stop", "length"):
        expected = chat_message(text, finish, options, call_id=lambda: "id")
        assert _stream_message(_chunks(text, cuts), options, finish) == expected
        whole = bool(out.calls) and all(c.complete for c in out.calls)
        assert expected[1] == ("tool_calls" if finish == "stop" and whole else finish)


def test_render_then_parse_gold_tools_block() -> None:
    """The encoder's own rendering of the example's calls (its DSML is checked against DeepSeek's gold text
    in test_chat_encoding) parses back to those calls."""
    m = next(m for m in EXAMPLE["messages"] if m.get("tool_calls") and len(m["tool_calls"]) == 2)
    out = parse_tool_calls("\n\n" + render_tool_calls(m["tool_calls"]), EXAMPLE["tools"])
    assert [(c.name, c.arguments) for c in out.calls] == [
        (c["function"]["name"], c["function"]["arguments"]) for c in m["tool_calls"]
    ]
