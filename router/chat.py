"""Chat prompt encoding.

`encode_messages` is the DeepSeek-V3.2 encoding (spec §12.2; DeepSeek's ``encoding/encoding_dsv32.py``
ships no Jinja template): BOS, then per message

* system: content, then "\\n\\n" + the tools block if it carries ``tools``, then "\\n\\n" + the response
  format block if it carries ``response_format``;
* user: ``<｜User｜>{content}<｜Assistant｜>`` + ``<think>`` if it is the last user message in thinking
  mode, else ``</think>``;
* developer: a user turn whose content is [tools block][response format] + "\\n\\n# The user's message
  is: {content}";
* assistant: [reasoning + ``</think>`` — thinking mode, after the last user message only] + content +
  ["\\n\\n" + DSML tool calls] + EOS;
* tool: results follow the assistant's EOS directly: "\\n\\n<function_results>" before the first of a
  batch, "\\n<result>{content}</result>" each, "\\n</function_results>" + "\\n\\n<think>" (thinking mode,
  after the last user message) or "\\n\\n</think>" after the last one.

In thinking mode the reasoning of assistant turns before the last user message is dropped. A request's
``tools`` and ``response_format`` go on the leading system message (as DeepSeek's encoder reads them from a
message); ``tool_instruction`` (tool_choice required / named, parallel_tool_calls false) is splitserve's own
paragraph after the tools block. The model's output is read back by `splitserve.router.chat_output`.

`load_chat_encoder` prefers a checkpoint's own Jinja ``chat_template`` (tokenizer_config.json) and falls
back to this encoding.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from splitserve.model.tokenizer import (
    ASSISTANT_TOKEN,
    BOS_TOKEN,
    DSML_TOKEN,
    EOS_TOKEN,
    THINK_END_TOKEN,
    THINK_START_TOKEN,
    USER_TOKEN,
)

logger = logging.getLogger(__name__)


class ChatEncodingError(ValueError):
    """The messages cannot be encoded (the router answers 400)."""


_TOOLS_TEMPLATE = """## Tools

You have access to a set of tools you can use to answer the user's question.
You can invoke functions by writing a "<{dsml}function_calls>" block like the following as part of your reply to the user:
<{dsml}function_calls>
<{dsml}invoke name="$FUNCTION_NAME">
<{dsml}parameter name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE</{dsml}parameter>
...
</{dsml}invoke>
<{dsml}invoke name="$FUNCTION_NAME2">
...
</{dsml}invoke>
</{dsml}function_calls>

String and scalar parameters should be specified as is without any escaping or quotes, while lists and objects should use JSON format. The "string" attribute should be set to "true" for string type parameters and "false" for other types (numbers, booleans, arrays, objects).

If the thinking_mode is enabled, then after function results you should strongly consider outputting a thinking block. Here is an example:

<{dsml}function_calls>
...
</{dsml}function_calls>

<function_results>
...
</function_results>

{think}...thinking about results{end_think}

Here are the functions available in JSONSchema format:
<functions>
{schemas}
</functions>
"""

_RESPONSE_FORMAT_TEMPLATE = (
    "## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n{schema}"
)


def _to_json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def render_tools(tools: Sequence[Mapping[str, Any]]) -> str:
    """The tools block for OpenAI-format tools (``[{"type": "function", "function": {...}}]``)."""
    schemas = []
    for tool in tools:
        fn = tool.get("function") if isinstance(tool, Mapping) else None
        if not isinstance(fn, Mapping):
            raise ChatEncodingError("each tool must be {'type': 'function', 'function': {...}}")
        schemas.append(_to_json(fn))
    return _TOOLS_TEMPLATE.format(
        dsml=DSML_TOKEN, think=THINK_START_TOKEN, end_think=THINK_END_TOKEN, schemas="\n".join(schemas)
    )


def _render_response_format(response_format: Any) -> str:
    return _RESPONSE_FORMAT_TEMPLATE.format(schema=_to_json(response_format))


def render_tool_calls(tool_calls: Sequence[Mapping[str, Any]]) -> str:
    """The DSML block for OpenAI-format tool calls, without the leading "\\n\\n"."""
    invokes = []
    for call in tool_calls:
        fn = call.get("function") if isinstance(call, Mapping) else None
        if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
            raise ChatEncodingError("each tool call must have function.name")
        raw = fn.get("arguments", "{}")
        try:
            args = json.loads(raw) if isinstance(raw, str) else raw
        except json.JSONDecodeError as e:
            raise ChatEncodingError(f"tool call arguments are not JSON: {e}") from None
        if not isinstance(args, Mapping):
            raise ChatEncodingError("tool call arguments must be a JSON object")
        params = []
        for key, value in args.items():
            is_str = isinstance(value, str)
            params.append(
                f'<{DSML_TOKEN}parameter name="{key}" string="{"true" if is_str else "false"}">'
                f"{value if is_str else _to_json(value)}</{DSML_TOKEN}parameter>"
            )
        invokes.append(f'<{DSML_TOKEN}invoke name="{fn["name"]}">\n' + "\n".join(params) + f"\n</{DSML_TOKEN}invoke>")
    return f"<{DSML_TOKEN}function_calls>\n" + "\n".join(invokes) + f"\n</{DSML_TOKEN}function_calls>"


def _content_text(msg: Mapping[str, Any]) -> str:
    content = msg.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts
        parts = []
        for part in content:
            if isinstance(part, Mapping) and part.get("type") == "text" and isinstance(part.get("text"), str):
                parts.append(part["text"])
            else:
                raise ChatEncodingError("only text content parts are supported")
        return "".join(parts)
    raise ChatEncodingError("message content must be a string or a list of text parts")


def _last_user_index(messages: Sequence[Mapping[str, Any]]) -> int:
    for i in range(len(messages) - 1, -1, -1):
        if messages[i].get("role") in ("user", "developer"):
            return i
    return -1


def _render_message(i: int, messages: Sequence[Mapping[str, Any]], thinking: bool, last_user: int) -> str:
    msg = messages[i]
    role = msg.get("role")
    content = _content_text(msg)
    tools = msg.get("tools")
    response_format = msg.get("response_format")

    if role == "system":
        out = content
        if tools:
            out += "\n\n" + render_tools(tools)
            if msg.get("tool_instruction"):
                out += "\n" + msg["tool_instruction"] + "\n"
        if response_format:
            out += "\n\n" + _render_response_format(response_format)
        return out

    if role in ("user", "developer"):
        if role == "developer":
            if not content:
                raise ChatEncodingError("a developer message needs content")
            body = ""
            if tools:
                body += "\n\n" + render_tools(tools)
            if response_format:
                body += "\n\n" + _render_response_format(response_format)
            content = body + f"\n\n# The user's message is: {content}"
        tail = THINK_START_TOKEN if (i == last_user and thinking) else THINK_END_TOKEN
        return f"{USER_TOKEN}{content}{ASSISTANT_TOKEN}{tail}"

    if role == "assistant":
        tool_calls = msg.get("tool_calls")
        calls = "\n\n" + render_tool_calls(tool_calls) if tool_calls else ""
        reasoning = ""
        if thinking and i > last_user:
            r = msg.get("reasoning_content")
            if not (r or tool_calls):
                raise ChatEncodingError(
                    "in thinking mode an assistant message after the last user message needs "
                    "reasoning_content or tool_calls"
                )
            reasoning = (r or "") + THINK_END_TOKEN
        return f"{reasoning}{content}{calls}{EOS_TOKEN}"

    if role == "tool":
        j = i - 1
        while j >= 0 and messages[j].get("role") == "tool":
            j -= 1
        if j < 0 or messages[j].get("role") != "assistant":
            raise ChatEncodingError(f"tool message at {i} does not follow an assistant message with tool_calls")
        order = i - j  # 1-based position of this result in the batch
        batch = messages[j].get("tool_calls") or []
        if len(batch) < order:
            raise ChatEncodingError(f"tool message at {i} has no matching tool call")
        out = "\n\n<function_results>" if order == 1 else ""
        out += f"\n<result>{content}</result>"
        if order == len(batch):
            out += "\n</function_results>"
            out += "\n\n" + (THINK_START_TOKEN if (i >= last_user and thinking) else THINK_END_TOKEN)
        return out

    raise ChatEncodingError(f"unknown role {role!r}")


def encode_messages(
    messages: Sequence[Mapping[str, Any]],
    thinking: bool = False,
    tools: Sequence[Mapping[str, Any]] | None = None,
    drop_thinking: bool = True,
    response_format: Mapping[str, Any] | None = None,
    tool_instruction: str | None = None,
) -> str:
    """The DeepSeek-V3.2 prompt for OpenAI-style `messages`.

    `tools` (request-level OpenAI tools) and `response_format` (the request's, rendered as the encoder
    renders a message's ``response_format``) are attached to the leading system message, or to a new
    empty system message put first when there is none. `tool_instruction` (splitserve's, for
    ``tool_choice`` required / named and ``parallel_tool_calls: false``) is a paragraph after the tools
    block. `drop_thinking` (thinking mode only) removes the reasoning of assistant turns before the last
    user message, as DeepSeek's encoder does by default.
    """
    msgs: list[Mapping[str, Any]] = []
    for m in messages:
        if not isinstance(m, Mapping):
            raise ChatEncodingError("each message must be an object")
        msgs.append(m)
    extra: dict[str, Any] = {}
    if tools:
        extra["tools"] = list(tools)
        if tool_instruction:
            extra["tool_instruction"] = tool_instruction
    if response_format:
        extra["response_format"] = dict(response_format)
    if extra:
        first = msgs[0] if msgs else None
        if first is not None and first.get("role") == "system" and not any(first.get(k) for k in extra):
            msgs[0] = {**first, **extra}
        else:
            msgs.insert(0, {"role": "system", "content": "", **extra})
    last_user = _last_user_index(msgs)
    if thinking and drop_thinking:
        msgs = [
            {k: v for k, v in m.items() if k != "reasoning_content"}
            if m.get("role") == "assistant" and i < last_user
            else m
            for i, m in enumerate(msgs)
        ]
    return BOS_TOKEN + "".join(_render_message(i, msgs, thinking, last_user) for i in range(len(msgs)))


class ChatEncoder(Protocol):
    """Turns chat messages into the prompt string (the router tokenizes it)."""

    def __call__(
        self,
        messages: Sequence[Mapping[str, Any]],
        thinking: bool = False,
        tools: Sequence[Mapping[str, Any]] | None = None,
        *,
        response_format: Mapping[str, Any] | None = None,
        tool_instruction: str | None = None,
    ) -> str: ...


class JinjaChatEncoder:
    """Renders a Hugging Face style Jinja chat template (sandboxed, as transformers does)."""

    def __init__(self, template: str, bos_token: str = BOS_TOKEN, eos_token: str = EOS_TOKEN) -> None:
        try:
            import jinja2
            from jinja2.sandbox import ImmutableSandboxedEnvironment
        except ImportError as e:  # pragma: no cover - jinja2 is installed with fastapi's extras here
            raise RuntimeError("the checkpoint has a chat_template but jinja2 is not installed") from e

        def raise_exception(message: str) -> None:
            raise ChatEncodingError(message)

        def tojson(value: Any, indent: int | None = None) -> str:
            return json.dumps(value, ensure_ascii=False, indent=indent)

        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        self._template = env.from_string(template)
        self._template_error: type[Exception] = jinja2.TemplateError
        self._bos = bos_token
        self._eos = eos_token

    def __call__(
        self,
        messages: Sequence[Mapping[str, Any]],
        thinking: bool = False,
        tools: Sequence[Mapping[str, Any]] | None = None,
        *,
        response_format: Mapping[str, Any] | None = None,
        tool_instruction: str | None = None,
    ) -> str:
        """`response_format` and `tool_instruction` reach the template as variables of those names."""
        try:
            return self._template.render(
                messages=list(messages),
                tools=list(tools) if tools else None,
                response_format=dict(response_format) if response_format else None,
                tool_instruction=tool_instruction,
                add_generation_prompt=True,
                thinking=thinking,
                enable_thinking=thinking,
                bos_token=self._bos,
                eos_token=self._eos,
            )
        except ChatEncodingError:
            raise
        except (self._template_error, TypeError, ValueError, KeyError, AttributeError) as e:
            raise ChatEncodingError(f"chat template failed: {e}") from None


def _token_text(value: Any, default: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    return default


def load_chat_encoder(checkpoint_dir: str | Path) -> ChatEncoder:
    """The checkpoint's own ``chat_template`` (tokenizer_config.json) if it has one, else `encode_messages`."""
    path = Path(checkpoint_dir) / "tokenizer_config.json"
    config: dict[str, Any] = {}
    if path.is_file():
        config = json.loads(path.read_text(encoding="utf-8"))
    template: Any = config.get("chat_template")
    if isinstance(template, list):  # the list-of-named-templates form: take "default"
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
        template = named.get("default")
    if isinstance(template, str) and template:
        logger.info("using the chat template of %s", checkpoint_dir)
        return JinjaChatEncoder(
            template,
            bos_token=_token_text(config.get("bos_token"), BOS_TOKEN),
            eos_token=_token_text(config.get("eos_token"), EOS_TOKEN),
        )
    logger.info("no chat template in %s: using the DeepSeek-V3.2 encoding", checkpoint_dir)
    return encode_messages
