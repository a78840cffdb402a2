"""The DeepSeek-V3.2 chat encoding against DeepSeek's documented example and the spec's rules (§12.2)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from splitserve.router.chat import ChatEncodingError, JinjaChatEncoder, encode_messages, load_chat_encoder

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
U, A = "<｜User｜>", "<｜Assistant｜>"

EXAMPLE = json.loads((Path(__file__).parent / "data" / "dsv32_encoding_example.json").read_text(encoding="utf-8"))


def test_deepseek_gold_example_tools_on_system_message() -> None:
    # DeepSeek's test_encoding_dsv32.py: messages[0]["tools"] = tools, thinking mode, drop_thinking
    messages = [dict(m) for m in EXAMPLE["messages"]]
    messages[0]["tools"] = EXAMPLE["tools"]
    assert encode_messages(messages, thinking=True) == EXAMPLE["expected"]


def test_deepseek_gold_example_request_level_tools() -> None:
    assert encode_messages(EXAMPLE["messages"], thinking=True, tools=EXAMPLE["tools"]) == EXAMPLE["expected"]


def test_readme_thinking_example() -> None:
    # V3.2 README: reasoning of turns before the last user message is dropped; prompt ends with <think>
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "Hello! I am DeepSeek.", "reasoning_content": "thinking..."},
        {"role": "user", "content": "1+1=?"},
    ]
    assert encode_messages(messages, thinking=True) == (
        f"{BOS}You are a helpful assistant.{U}hello{A}</think>Hello! I am DeepSeek.{EOS}{U}1+1=?{A}<think>"
    )
    # chat (non-thinking) mode: every user turn is closed with </think>
    assert encode_messages(messages, thinking=False) == (
        f"{BOS}You are a helpful assistant.{U}hello{A}</think>Hello! I am DeepSeek.{EOS}{U}1+1=?{A}</think>"
    )


def test_minimal_prompts() -> None:
    assert encode_messages([{"role": "user", "content": "hi"}]) == f"{BOS}{U}hi{A}</think>"
    assert encode_messages([{"role": "user", "content": "hi"}], thinking=True) == f"{BOS}{U}hi{A}<think>"
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    assert encode_messages([{"role": "user", "content": parts}]) == f"{BOS}{U}ab{A}</think>"


def test_tool_call_parameters_string_and_json() -> None:
    call = {
        "type": "function",
        "function": {"name": "f", "arguments": json.dumps({"s": "x y", "n": 3, "l": [1, "a"], "o": {"k": True}})},
    }
    messages = [
        {"role": "user", "content": "go"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "content": "done"},
    ]
    d = "｜DSML｜"
    assert encode_messages(messages) == (
        f'{BOS}{U}go{A}</think>\n\n<{d}function_calls>\n<{d}invoke name="f">\n'
        f'<{d}parameter name="s" string="true">x y</{d}parameter>\n'
        f'<{d}parameter name="n" string="false">3</{d}parameter>\n'
        f'<{d}parameter name="l" string="false">[1, "a"]</{d}parameter>\n'
        f'<{d}parameter name="o" string="false">{{"k": true}}</{d}parameter>\n'
        f"</{d}invoke>\n</{d}function_calls>{EOS}"
        "\n\n<function_results>\n<result>done</result>\n</function_results>\n\n</think>"
    )
    # in thinking mode, results after the last user message reopen thinking
    assert encode_messages(messages, thinking=True).endswith("</function_results>\n\n<think>")


def test_developer_role_and_response_format() -> None:
    tools = [{"type": "function", "function": {"name": "t", "parameters": {"type": "object"}}}]
    out = encode_messages([{"role": "developer", "content": "Q?", "tools": tools}], thinking=True)
    assert out.startswith(f"{BOS}{U}\n\n## Tools\n\nYou have access to a set of tools")
    assert out.endswith(
        '<functions>\n{"name": "t", "parameters": {"type": "object"}}\n</functions>\n\n\n# The user\'s message is: Q?'
        + f"{A}<think>"
    )
    rf = {"type": "json_object"}
    out = encode_messages([{"role": "system", "content": "S", "response_format": rf}, {"role": "user", "content": "u"}])
    assert out == (
        f"{BOS}S\n\n## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n"
        f'{{"type": "json_object"}}{U}u{A}</think>'
    )


def test_request_tools_without_system_message_make_one() -> None:
    tools = [{"type": "function", "function": {"name": "t"}}]
    out = encode_messages([{"role": "user", "content": "u"}], tools=tools)
    assert out.startswith(f"{BOS}\n\n## Tools\n\n")
    assert out.endswith(f'{{"name": "t"}}\n</functions>\n{U}u{A}</think>')


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "tool", "content": "x"}],
        [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}, {"role": "tool", "content": "x"}],
        [{"role": "wizard", "content": "x"}],
        [{"role": "developer", "content": ""}],
        [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
        [
            {"role": "user", "content": "u"},
            {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": "{bad"}}]},
        ],
    ],
)
def test_invalid_conversations_raise(messages: list[dict]) -> None:
    with pytest.raises(ChatEncodingError):
        encode_messages(messages)


def test_thinking_mode_requires_reasoning_after_last_user() -> None:
    with pytest.raises(ChatEncodingError):
        encode_messages([{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}], thinking=True)


def test_loader_prefers_checkpoint_template(tmp_path: Path) -> None:
    template = (
        "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}[assistant]{% if thinking %}<think>{% endif %}{% endif %}"
    )
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": template, "bos_token": {"content": "<s>"}}), encoding="utf-8"
    )
    enc = load_chat_encoder(tmp_path)
    assert isinstance(enc, JinjaChatEncoder)
    assert enc([{"role": "user", "content": "hi"}], thinking=True) == "<s>[user]hi[assistant]<think>"


def test_loader_template_errors_are_encoding_errors(tmp_path: Path) -> None:
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": "{{ raise_exception('no system role') }}"}), encoding="utf-8"
    )
    with pytest.raises(ChatEncodingError, match="no system role"):
        load_chat_encoder(tmp_path)([{"role": "system", "content": "x"}])


def test_loader_falls_back_to_dsv32_encoding(tmp_path: Path) -> None:
    assert load_chat_encoder(tmp_path) is encode_messages
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": False}), encoding="utf-8")
    assert load_chat_encoder(tmp_path) is encode_messages
