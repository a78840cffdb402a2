"""The chat API DeepSeek-V3.2 users expect, through the `openai` client against a real uvicorn server whose
backend writes known model output (`ScriptedBackend`): reasoning_content, tool calls (whole and streamed),
tool_choice, response_format, multi-turn round trips, and the sampling fields chat shares with completions
(logit_bias's behaviour against the reference bigram backend, `ReferenceBackend`).

Expected values come from the scripted text (written here in V3.2's format), the tokenizer, and the chat
encoder (itself checked against DeepSeek's gold example in test_chat_encoding.py).
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import openai
import pytest
from tokenizers import Tokenizer

from splitserve.engine.sampling_params import SamplingParams
from splitserve.router.chat import encode_messages
from splitserve.router.openai_api import ApiLimits
from splitserve.router.testing import ReferenceBackend, ScriptedBackend

from .conftest import MODEL, VOCAB

EOS_ID = 1
D = "｜DSML｜"
THINK = {"chat_template_kwargs": {"thinking": True}}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather for a city on a date",
            "parameters": {
                "type": "object",
                "properties": {"location": {"type": "string"}, "days": {"type": "integer"}},
                "required": ["location"],
            },
        },
    },
    {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}},
]
REASONING = "The user wants the weather; I should call the tool for Paris."
POEM = "def write(): return 'a long string value, streamed as it is written'"
BLOCK = (
    f"\n\n<{D}function_calls>\n"
    f'<{D}invoke name="get_weather">\n'
    f'<{D}parameter name="location" string="true">Paris</{D}parameter>\n'
    f'<{D}parameter name="days" string="false">3</{D}parameter>\n'
    f"</{D}invoke>\n"
    f'<{D}invoke name="get_time">\n'
    f'<{D}parameter name="note" string="true">{POEM}</{D}parameter>\n'
    f"</{D}invoke>\n"
    f"</{D}function_calls>"
)
CALLS = [("get_weather", {"location": "Paris", "days": 3}), ("get_time", {"note": POEM})]
USER = [{"role": "user", "content": "Weather in Paris?"}]


@pytest.fixture(scope="module")
def server(start_server) -> tuple[str, ScriptedBackend]:  # noqa: ANN001
    limits = ApiLimits(vocab_size=VOCAB, max_context_len=8192, max_n=4, max_body_bytes=256 * 1024)
    return start_server(ScriptedBackend([EOS_ID]), limits=limits)


@pytest.fixture(scope="module")
def backend(server) -> ScriptedBackend:  # noqa: ANN001
    return server[1]


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:  # noqa: ANN001
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=20)


@pytest.fixture()
def say(backend: ScriptedBackend, tok: Tokenizer):  # noqa: ANN201
    """Makes the model write `text` (then EOS); returns its token ids."""

    def set_script(text: str, eos: bool = True) -> list[int]:
        ids = tok.encode(text, add_special_tokens=False).ids
        assert tok.decode(ids, skip_special_tokens=True) == text  # the tokenizer round-trips it
        backend.script = ids + ([EOS_ID] if eos else [])
        return ids

    return set_script


def _last_prompt(backend: ScriptedBackend, tok: Tokenizer) -> str:
    ids, _params = list(backend.requests.values())[-1]
    return tok.decode(ids, skip_special_tokens=False)


def _extra(obj: Any, key: str) -> Any:
    return (obj.model_extra or {}).get(key)


def _stream(client: openai.OpenAI, **kw: Any) -> tuple[list[Any], dict[int, dict[str, Any]]]:
    """All chunks, and per choice: reasoning, content, tool calls (accumulated as a client does), finish."""
    chunks = list(client.chat.completions.create(model=MODEL, stream=True, **kw))
    out: dict[int, dict[str, Any]] = {}
    for ch in chunks:
        for c in ch.choices:
            acc = out.setdefault(c.index, {"reasoning": "", "content": "", "calls": [], "finish": None, "order": []})
            d = c.delta
            if _extra(d, "reasoning_content"):
                acc["reasoning"] += _extra(d, "reasoning_content")
                acc["order"].append("r")
            if d.content:
                acc["content"] += d.content
                acc["order"].append("c")
            for tc in d.tool_calls or []:
                if tc.id is not None:  # the first delta of a call: index, id and name
                    assert tc.index == len(acc["calls"]) and tc.function.name and tc.type == "function"
                    acc["calls"].append({"id": tc.id, "name": tc.function.name, "args": tc.function.arguments or ""})
                else:
                    assert tc.function.name is None
                    acc["calls"][tc.index]["args"] += tc.function.arguments
                acc["order"].append("t")
            if c.finish_reason is not None:
                acc["finish"] = c.finish_reason
    return chunks, out


# --------------------------------------------------------------------------------------------------
# Reasoning


@pytest.mark.parametrize(
    "kw",
    [
        {"extra_body": THINK},
        {"extra_body": {"thinking": {"type": "enabled"}}},
        {"reasoning_effort": "high"},
    ],
)
def test_thinking_returns_reasoning_content(client: openai.OpenAI, backend, tok, say, kw: dict) -> None:  # noqa: ANN001
    say(REASONING + "</think>It is sunny in Paris.")
    r = client.chat.completions.create(model=MODEL, messages=USER, **kw)
    assert _last_prompt(backend, tok) == encode_messages(USER, thinking=True)  # ends with <think>
    m = r.choices[0].message
    assert _extra(m, "reasoning_content") == REASONING
    assert m.content == "It is sunny in Paris."
    assert r.choices[0].finish_reason == "stop"


def test_non_thinking_has_no_reasoning(client: openai.OpenAI, backend, tok, say) -> None:  # noqa: ANN001
    say("Plain answer.")
    for kw in ({}, {"reasoning_effort": "none"}, {"extra_body": {"thinking": {"type": "disabled"}}}):
        r = client.chat.completions.create(model=MODEL, messages=USER, **kw)
        assert _last_prompt(backend, tok) == encode_messages(USER, thinking=False)
        assert r.choices[0].message.content == "Plain answer."
        assert "reasoning_content" not in (r.choices[0].message.model_extra or {})


def test_conflicting_thinking_switches_are_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=USER, reasoning_effort="none", extra_body=THINK)


def test_thinking_streams_reasoning_then_content(client: openai.OpenAI, say) -> None:  # noqa: ANN001
    say(REASONING + "</think>It is sunny.")
    _chunks, out = _stream(client, messages=USER, extra_body=THINK)
    acc = out[0]
    assert (acc["reasoning"], acc["content"], acc["finish"]) == (REASONING, "It is sunny.", "stop")
    assert acc["order"].index("c") > max(i for i, k in enumerate(acc["order"]) if k == "r")
    assert acc["order"].count("r") > 1  # streamed, not sent at the end


def test_max_completion_tokens_cuts_inside_reasoning(
    client: openai.OpenAI,
    tok: Tokenizer,
    say,  # noqa: ANN001
) -> None:
    ids = say(REASONING + "</think>answer")
    r = client.chat.completions.create(model=MODEL, messages=USER, max_completion_tokens=5, extra_body=THINK)
    assert r.choices[0].finish_reason == "length"
    assert _extra(r.choices[0].message, "reasoning_content") == tok.decode(ids[:5])
    assert r.choices[0].message.content == ""
    assert r.usage.completion_tokens == 5


# --------------------------------------------------------------------------------------------------
# Tool calls


def _check_calls(calls: list[tuple[str, str, str]]) -> None:
    """(id, name, arguments) against CALLS; ids unique."""
    assert [(n, json.loads(a)) for _i, n, a in calls] == CALLS
    assert len({i for i, _n, _a in calls}) == len(calls) and all(i.startswith("call_") for i, _n, _a in calls)


def test_tool_calls_non_streaming(client: openai.OpenAI, backend, tok, say) -> None:  # noqa: ANN001
    say(REASONING + "</think>Let me check." + BLOCK)
    r = client.chat.completions.create(model=MODEL, messages=USER, tools=TOOLS, extra_body=THINK)
    assert _last_prompt(backend, tok) == encode_messages(USER, thinking=True, tools=TOOLS)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls"
    assert _extra(c.message, "reasoning_content") == REASONING
    assert c.message.content == "Let me check."
    _check_calls([(t.id, t.function.name, t.function.arguments) for t in c.message.tool_calls])
    assert all(t.type == "function" for t in c.message.tool_calls)


@pytest.mark.parametrize("tokens_per_delta", [1, 4])
def test_tool_calls_streaming(client: openai.OpenAI, backend, say, tokens_per_delta: int) -> None:  # noqa: ANN001
    backend.tokens_per_delta = tokens_per_delta
    try:
        say(REASONING + "</think>" + BLOCK)
        chunks, out = _stream(client, messages=USER, tools=TOOLS, extra_body=THINK)
    finally:
        backend.tokens_per_delta = 1
    acc = out[0]
    assert acc["finish"] == "tool_calls" and acc["reasoning"] == REASONING and acc["content"] == ""
    _check_calls([(c["id"], c["name"], c["args"]) for c in acc["calls"]])
    # the long string value arrives in several fragments, while it is written
    fragments = [
        tc.function.arguments
        for ch in chunks
        for c in ch.choices
        for tc in c.delta.tool_calls or []
        if tc.index == 1 and tc.id is None
    ]
    assert len(fragments) > 3 and "".join(fragments) == json.dumps({"note": POEM})


def test_call_cut_by_a_stop_string_is_not_finished(client: openai.OpenAI, say) -> None:  # noqa: ANN001
    say(BLOCK)
    r = client.chat.completions.create(model=MODEL, messages=USER, tools=TOOLS, stop=["Paris"])
    c = r.choices[0]
    assert c.finish_reason == "stop"
    assert [(t.function.name, t.function.arguments) for t in c.message.tool_calls] == [
        ("get_weather", '{"location": "')
    ]
    _c, out = _stream(client, messages=USER, tools=TOOLS, stop=["Paris"])
    assert out[0]["finish"] == "stop" and [(x["name"], x["args"]) for x in out[0]["calls"]] == [
        ("get_weather", '{"location": "')
    ]


def test_malformed_block_is_plain_content(client: openai.OpenAI, say) -> None:  # noqa: ANN001
    text = f"Sure.\n\n<{D}function_calls>\n<{D}bogus>oops</{D}function_calls>"
    say(text)
    r = client.chat.completions.create(model=MODEL, messages=USER, tools=TOOLS)
    assert r.choices[0].message.content == text and not r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "stop"
    _c, out = _stream(client, messages=USER, tools=TOOLS)
    assert (out[0]["content"], out[0]["calls"], out[0]["finish"]) == (text, [], "stop")


def test_tool_choice_none_leaves_tools_out(client: openai.OpenAI, backend, tok, say) -> None:  # noqa: ANN001
    say("text" + BLOCK)
    r = client.chat.completions.create(model=MODEL, messages=USER, tools=TOOLS, tool_choice="none")
    assert _last_prompt(backend, tok) == encode_messages(USER)
    assert r.choices[0].message.content == "text" + BLOCK and r.choices[0].finish_reason == "stop"


def test_tool_choice_required_and_named(client: openai.OpenAI, backend, tok, say) -> None:  # noqa: ANN001
    say("No call.")
    r = client.chat.completions.create(model=MODEL, messages=USER, tools=TOOLS, tool_choice="required")
    prompt = _last_prompt(backend, tok)
    assert prompt.startswith(encode_messages(USER, tools=TOOLS).split("<｜User｜>")[0])  # the tools block
    assert "You must call at least one of the functions above in this reply." in prompt
    # the model cannot be forced: a reply without a call is plain content
    assert r.choices[0].message.content == "No call." and r.choices[0].finish_reason == "stop"

    named = {"type": "function", "function": {"name": "get_time"}}
    client.chat.completions.create(model=MODEL, messages=USER, tools=TOOLS, tool_choice=named)
    prompt = _last_prompt(backend, tok)
    assert '"name": "get_time"' in prompt and '"name": "get_weather"' not in prompt
    assert 'You must call the function "get_time" in this reply.' in prompt

    bad = {"type": "function", "function": {"name": "nope"}}
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=USER, tools=TOOLS, tool_choice=bad)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=USER, tool_choice="required")


def test_parallel_tool_calls_false_keeps_one(client: openai.OpenAI, backend, tok, say) -> None:  # noqa: ANN001
    say(BLOCK)
    r = client.chat.completions.create(model=MODEL, messages=USER, tools=TOOLS, parallel_tool_calls=False)
    assert "Call at most one function in this reply." in _last_prompt(backend, tok)
    calls = r.choices[0].message.tool_calls
    assert [(t.function.name, json.loads(t.function.arguments)) for t in calls] == CALLS[:1]
    _c, out = _stream(client, messages=USER, tools=TOOLS, parallel_tool_calls=False)
    assert [(c["name"], json.loads(c["args"])) for c in out[0]["calls"]] == CALLS[:1]


def test_multi_turn_round_trip(client: openai.OpenAI, backend, tok, say) -> None:  # noqa: ANN001
    """The assistant message the API returned, sent back with tool results, is encoded to exactly the text
    the model wrote for it."""
    written = REASONING + "</think>Checking." + BLOCK
    say(written)
    r = client.chat.completions.create(model=MODEL, messages=USER, tools=TOOLS, extra_body=THINK)
    assistant = r.choices[0].message.model_dump(exclude_none=True)
    results = [
        {"role": "tool", "tool_call_id": t.id, "content": f"result {i}"}
        for i, t in enumerate(r.choices[0].message.tool_calls)
    ]
    messages = [*USER, assistant, *results]
    say(REASONING + "</think>Sunny, and it is noon.")
    r2 = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, extra_body=THINK)
    prompt = _last_prompt(backend, tok)
    first = encode_messages(USER, thinking=True, tools=TOOLS)
    assert prompt.startswith(first + written + "<｜end▁of▁sentence｜>\n\n<function_results>")
    assert prompt == encode_messages(messages, thinking=True, tools=TOOLS)
    assert prompt.endswith("</function_results>\n\n<think>")
    assert r2.choices[0].message.content == "Sunny, and it is noon."


# --------------------------------------------------------------------------------------------------
# response_format and the fields chat shares with completions


def test_response_format_in_prompt(client: openai.OpenAI, backend, tok, say) -> None:  # noqa: ANN001
    say('{"city": "Paris"}')
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    rf = {"type": "json_schema", "json_schema": {"name": "place", "schema": schema, "strict": True}}
    r = client.chat.completions.create(model=MODEL, messages=USER, response_format=rf)
    assert r.choices[0].message.content == '{"city": "Paris"}'
    assert _last_prompt(backend, tok) == encode_messages(
        [{"role": "system", "content": "", "response_format": rf}, *USER]
    )
    client.chat.completions.create(model=MODEL, messages=USER, response_format={"type": "json_object"})
    assert "You MUST strictly adhere to the following schema to reply:\n" + json.dumps(
        {"type": "json_object"}
    ) in _last_prompt(backend, tok)
    client.chat.completions.create(model=MODEL, messages=USER, response_format={"type": "text"})
    assert _last_prompt(backend, tok) == encode_messages(USER)
    for bad in (
        {"type": "json_schema"},
        {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strng"}}},
        {"type": "json_schema", "json_schema": {"name": "bad name!", "schema": {}}},
        {"type": "yaml"},
    ):
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model=MODEL, messages=USER, response_format=bad)


def test_n_stop_and_usage(client: openai.OpenAI, say) -> None:  # noqa: ANN001
    ids = say(REASONING + "</think>Sunny today. Rain tomorrow.")
    r = client.chat.completions.create(model=MODEL, messages=USER, n=2, stop=[" Rain"], extra_body=THINK)
    assert [c.index for c in r.choices] == [0, 1]
    for c in r.choices:
        assert (_extra(c.message, "reasoning_content"), c.message.content) == (REASONING, "Sunny today.")
        assert c.finish_reason == "stop"
    chunks, out = _stream(client, messages=USER, n=2, extra_body=THINK, stream_options={"include_usage": True})
    assert sorted(out) == [0, 1]
    for acc in out.values():
        assert (acc["reasoning"], acc["content"], acc["finish"]) == (REASONING, "Sunny today. Rain tomorrow.", "stop")
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 2 * (len(ids) + 1)
    assert all(ch.usage is None for ch in chunks[:-1])


def test_logit_bias_reaches_the_backend_in_chat_as_in_completions(server, client: openai.OpenAI, say) -> None:  # noqa: ANN001
    backend = server[1]
    for stream in (False, True):
        say("Sunny.")
        r = client.chat.completions.create(model=MODEL, messages=USER, logit_bias={"5": 10, "3": -100}, stream=stream)
        if stream:
            list(r)  # drain the stream
        assert list(backend.requests.values())[-1][1].logit_bias == ((3, -100.0), (5, 10.0))
        say("Sunny.")
        r = client.completions.create(model=MODEL, prompt="x", logit_bias={"1023": 0.5}, stream=stream)
        if stream:
            list(r)  # drain the stream
        assert list(backend.requests.values())[-1][1].logit_bias == ((1023, 0.5),)


@pytest.mark.parametrize(
    "bias",
    [{str(VOCAB): 1}, {"-3": 1}, {"x": 1}, {"5": 100.01}, {"5": -1000}, {str(t): 1 for t in range(301)}],
    ids=["outside-vocab", "negative", "not-an-id", "above-100", "below-100", "301-entries"],
)
def test_logit_bias_is_validated_in_chat_as_in_completions(server, client: openai.OpenAI, bias) -> None:  # noqa: ANN001
    started = len(server[1].requests)
    with pytest.raises(openai.BadRequestError, match="logit_bias") as e:
        client.chat.completions.create(model=MODEL, messages=USER, logit_bias=bias)
    assert e.value.body["param"].startswith("logit_bias")
    with pytest.raises(openai.BadRequestError, match="logit_bias"):
        client.completions.create(model=MODEL, prompt="x", logit_bias=bias)
    assert len(server[1].requests) == started  # refused before reaching the backend


@pytest.fixture(scope="module")
def reference(start_server) -> tuple[openai.OpenAI, ReferenceBackend]:  # noqa: ANN001
    """A server over the reference bigram model, whose sampling honours logit_bias (router/testing.py)."""
    url, backend = start_server(ReferenceBackend(VOCAB), limits=ApiLimits(vocab_size=VOCAB, max_context_len=8192))
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=20), backend


def _plain_token(tok: Tokenizer) -> int:
    """A token that decodes to letters alone, so repeating it repeats its text in chat content too."""
    return next(t for t in range(200, VOCAB) if (s := tok.decode([t])).isascii() and s.isalpha() and len(s) > 1)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_logit_bias_plus_100_forces_a_token_streaming_or_not(reference, tok: Tokenizer, temperature: float) -> None:  # noqa: ANN001
    client, _ = reference
    forced = _plain_token(tok)
    want = tok.decode([forced] * 6)
    kw = dict(
        model=MODEL,
        max_tokens=6,
        temperature=temperature,
        seed=3,
        logit_bias={str(forced): 100},
        extra_body={"ignore_eos": True},
    )
    chat = client.chat.completions.create(messages=USER, **kw)
    assert chat.choices[0].message.content == want
    streamed = "".join(
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(messages=USER, stream=True, **kw)
        if c.choices
    )
    assert streamed == want
    assert client.completions.create(prompt="x", **kw).choices[0].text == want
    streamed = "".join(c.choices[0].text for c in client.completions.create(prompt="x", stream=True, **kw) if c.choices)
    assert streamed == want
    # without the bias the model writes something else
    free = dict(kw, logit_bias=None)
    assert client.completions.create(prompt="x", **free).choices[0].text != want


def test_logit_bias_bans_tokens_and_logprobs_are_after_the_bias(reference, tok: Tokenizer) -> None:  # noqa: ANN001
    """Greedy output and reported logprobs equal the reference model's with the bias added (OpenAI reports
    logprobs after the bias), in completions and in chat."""
    client, backend = reference
    prompt = [7]
    free = backend.greedy_continuation(prompt, 8)
    bias = {free[0]: -100.0, free[3]: -100.0, 42: 4.0, 600: -2.5}
    want = backend.greedy_continuation(prompt, 8, bias)
    assert want != free and free[0] not in want and free[3] not in want
    params = SamplingParams(logit_bias=bias)
    r = client.completions.create(
        model=MODEL,
        prompt=prompt,
        max_tokens=8,
        temperature=0,
        logprobs=2,
        logit_bias={str(t): b for t, b in bias.items()},
        extra_body={"ignore_eos": True},
    )
    assert r.choices[0].text == tok.decode(want)
    prevs = [prompt[-1], *want[:-1]]
    ref = [float(backend.logprobs(p, params)[t]) for p, t in zip(prevs, want)]
    assert r.choices[0].logprobs.token_logprobs == pytest.approx(ref, rel=1e-9)
    assert ref != pytest.approx([float(backend.logprobs(p)[t]) for p, t in zip(prevs, want)], rel=1e-3)
    chat = client.chat.completions.create(
        model=MODEL,
        messages=USER,
        max_tokens=8,
        temperature=0,
        logprobs=True,
        logit_bias={str(t): b for t, b in bias.items()},
        extra_body={"ignore_eos": True},
    )
    sent = backend.requests[backend.started[-1]][0]
    want = backend.greedy_continuation(sent, 8, bias)
    prevs = [sent[-1], *want[:-1]]
    ref = [float(backend.logprobs(p, params)[t]) for p, t in zip(prevs, want)]
    assert [c.logprob for c in chat.choices[0].logprobs.content] == pytest.approx(ref, rel=1e-9)


def test_stream_sse_events_are_json(server, say) -> None:  # noqa: ANN001
    """Raw SSE: every event parses, the role chunk comes first and [DONE] last."""
    say(REASONING + "</think>" + BLOCK)
    body = {"model": MODEL, "messages": USER, "tools": TOOLS, "stream": True, **THINK}
    with (
        httpx.Client(base_url=server[0], timeout=20) as http,
        http.stream("POST", "/v1/chat/completions", json=body) as resp,
    ):
        raw = resp.read().decode()
    events = [e[len("data: ") :] for e in raw.split("\n\n") if e]
    assert events[-1] == "[DONE]"
    parsed = [json.loads(e) for e in events[:-1]]
    assert parsed[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert parsed[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_a_failing_parser_is_never_a_500(client: openai.OpenAI, say, monkeypatch) -> None:  # noqa: ANN001
    """Belt and braces: were a parser to raise, the text comes back as content (200, not 500)."""
    from splitserve.router import chat_output

    def broken(*_a: Any, **_k: Any) -> Any:
        raise RuntimeError("parser bug")

    monkeypatch.setattr(chat_output, "parse_tool_calls", broken)
    monkeypatch.setattr(chat_output.ToolCallStream, "feed", broken)
    say("text" + BLOCK)
    r = client.chat.completions.create(model=MODEL, messages=USER, tools=TOOLS)
    assert r.choices[0].message.content == "text" + BLOCK and r.choices[0].finish_reason == "stop"
    _c, out = _stream(client, messages=USER, tools=TOOLS)
    assert out[0]["content"] == "text" + BLOCK and out[0]["finish"] == "stop"


def test_completion_stream_announces_a_first_token_whose_text_is_held_back(
    client: openai.OpenAI, say, backend: ScriptedBackend
) -> None:  # noqa: ANN001
    """The first token's text can be held back (here: it may begin the stop string), yet the stream's
    first chunk comes with that token, empty, so a client's time to first token is the server's; the
    text then arrives whole, and only the first token gets an empty chunk."""
    ids = say("ab cd")
    first_text = client.completions.create(model=MODEL, prompt="x", max_tokens=1).choices[0].text
    assert first_text and "ab cd".startswith(first_text)
    chunks = list(
        client.completions.create(
            model=MODEL, prompt="x", max_tokens=len(ids) + 1, stream=True, stop=[first_text + "!"]
        )
    )
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert texts[0] == "" and "".join(texts) == "ab cd"
    assert all(texts[1:-1])  # no other empty chunk (the last may carry only the finish reason)
