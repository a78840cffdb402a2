"""The OpenAI request bodies the router accepts, their limits, OpenAI-style errors, and the step that turns
a validated request into prompt token ids and `SamplingParams`.

Validation happens in two stages, both before anything reaches a backend:

1. `parse_completion_request` / `parse_chat_request`: JSON syntax, types (strict: ``"5"`` is not an int,
   ``1`` is not a bool) and fixed ranges (temperature in [0, 2], top_p in (0, 1], ...);
2. `prepare_completion` / `prepare_chat`: what depends on the deployment (`ApiLimits`) and on the
   tokenizer: n, stop strings, token ids inside the vocabulary (prompt, stop_token_ids, logit_bias keys),
   prompt and context length.

`logit_bias` (completions and chat) follows OpenAI: a map of token id (a string of decimal digits) to a bias
in [-100, 100] added to the model's logits before sampling, at most `ApiLimits.max_logit_bias` entries.
Reported logprobs are those of the biased distribution (OpenAI's behaviour; see engine/sampler.py).

Every failure is an `ApiError`, rendered as ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from tokenizers import Tokenizer

from splitserve.engine.sampling_params import SamplingParams
from splitserve.model.tokenizer import BOS_TOKEN_ID
from splitserve.router.chat import ChatEncoder, ChatEncodingError, encode_messages
from splitserve.router.chat_output import ChatOutputOptions

logger = logging.getLogger(__name__)

MAX_LOGPROBS = 20
#: Positive temperatures below this are raised to it (0 stays greedy).
MIN_TEMPERATURE = 0.01
_SEED_MIN = -(2**63)
_SEED_MAX = 2**64 - 1


@dataclass(frozen=True, slots=True)
class ApiLimits:
    """What one deployment accepts. `max_prompt_tokens` defaults to ``max_context_len - 1``."""

    vocab_size: int
    max_context_len: int = 4096
    max_prompt_tokens: int | None = None
    max_n: int = 16
    max_stop_strings: int = 16
    max_stop_len: int = 256
    max_stop_token_ids: int = 64
    max_logit_bias: int = 300  # entries in one request's logit_bias (OpenAI allows 300)
    max_prompts: int = 256  # prompts x n in one /v1/completions request
    max_body_bytes: int = 8 * 1024 * 1024

    def __post_init__(self) -> None:
        for name in ("vocab_size", "max_context_len", "max_n", "max_stop_strings", "max_stop_len", "max_prompts"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_context_len < 2:
            raise ValueError("max_context_len must be >= 2")
        if self.max_prompt_tokens is not None and not 1 <= self.max_prompt_tokens < self.max_context_len:
            raise ValueError("max_prompt_tokens must be in [1, max_context_len)")
        if self.max_body_bytes < 1024:
            raise ValueError("max_body_bytes must be >= 1024")

    @property
    def prompt_token_limit(self) -> int:
        return self.max_prompt_tokens if self.max_prompt_tokens is not None else self.max_context_len - 1


# --------------------------------------------------------------------------------------------------
# Errors


class ApiError(Exception):
    """An OpenAI-style error response."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        type: str = "invalid_request_error",
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "bytes", "none", "literal"})


def _loc_to_param(loc: Sequence[int | str]) -> str | None:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in _TYPE_TAGS or "[" in part or part.startswith(("function-", "constrained-")):
            continue  # union-member tags pydantic adds to the location
        else:
            out += ("." if out else "") + part
    return out or None


def validation_error_to_api_error(err: ValidationError) -> ApiError:
    first = err.errors(include_url=False)[0]
    if first.get("type") == "json_invalid":
        return bad_request(f"Request body is not valid JSON: {first.get('msg')}", code="invalid_json")
    param = _loc_to_param(first.get("loc", ()))
    msg = first.get("msg", "invalid value")
    text = f"{param}: {msg}" if param else msg
    return bad_request(text, param=param, code="invalid_value" if param else None)


# --------------------------------------------------------------------------------------------------
# Request bodies


class _Strict(BaseModel):
    # Unknown fields are ignored (clients such as lm-eval send extras); known ones are type-checked strictly.
    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)


class StreamOptions(_Strict):
    include_usage: bool = False


Temperature = Annotated[float, Field(ge=0.0, le=2.0)]
TopP = Annotated[float, Field(gt=0.0, le=1.0)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]
Seed = Annotated[int, Field(ge=_SEED_MIN, le=_SEED_MAX)]
LogitBias = Annotated[float, Field(ge=-100.0, le=100.0)]


class _SamplingRequest(_Strict):
    model: str
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: Annotated[int, Field(ge=-1)] | None = None
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    n: Annotated[int, Field(ge=1)] = 1
    stop: str | list[str] | None = None
    seed: Seed | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    repetition_penalty: Annotated[float, Field(gt=0.0, le=100.0)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    user: str | None = None
    stop_token_ids: list[int] | None = None
    logit_bias: dict[str, LogitBias] | None = None


class CompletionRequest(_SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: Annotated[int, Field(ge=0)] | None = 16
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: Annotated[int, Field(ge=1)] | None = None


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class FunctionCall(_Strict):
    name: str
    arguments: str


class ToolCall(_Strict):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None


class FunctionDef(_Strict):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaFormat(_Strict):
    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False, populate_by_name=True)

    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class ThinkingOption(_Strict):
    """DeepSeek's API spelling: ``"thinking": {"type": "enabled"}``."""

    type: Literal["enabled", "disabled"]


ReasoningEffort = Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"]


class ChatCompletionRequest(_SamplingRequest):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    reasoning_effort: ReasoningEffort | None = None
    thinking: ThinkingOption | None = None
    chat_template_kwargs: dict[str, Any] | None = None


def parse_completion_request(body: bytes) -> CompletionRequest:
    try:
        return CompletionRequest.model_validate_json(body)
    except ValidationError as e:
        raise validation_error_to_api_error(e) from None


def parse_chat_request(body: bytes) -> ChatCompletionRequest:
    try:
        return ChatCompletionRequest.model_validate_json(body)
    except ValidationError as e:
        raise validation_error_to_api_error(e) from None


# --------------------------------------------------------------------------------------------------
# Validated request -> prompts + SamplingParams


@dataclass(frozen=True, slots=True)
class PreparedRequest:
    """What the app runs: one backend generation per (prompt, sample)."""

    prompts: list[list[int]]
    prompt_texts: list[str | None]  # the prompt as the client sent it (echo); None: decode the ids
    params: SamplingParams  # of sample 0; `params_for` derives the others
    n: int
    stream: bool
    include_usage: bool
    echo: bool = False
    logprobs: int | None = None  # alternatives to report per token (None: no logprobs)
    prompt_only: bool = False  # echo with max_tokens=0: the one generated token is dropped
    chat_output: ChatOutputOptions | None = None  # chat: how to read reasoning and tool calls

    @property
    def num_choices(self) -> int:
        return len(self.prompts) * self.n

    def params_for(self, prompt_index: int, sample_index: int) -> SamplingParams:
        """Sample i of a prompt runs with seed + i (every sample of a prompt has the same prompt)."""
        del prompt_index
        p = self.params
        if p.seed is not None and sample_index:
            return replace(p, seed=p.seed + sample_index)
        return p


def _stop_strings(stop: str | list[str] | None, limits: ApiLimits) -> tuple[str, ...]:
    if stop is None:
        return ()
    stops = list(dict.fromkeys([stop] if isinstance(stop, str) else stop))
    if len(stops) > limits.max_stop_strings:
        raise bad_request(f"at most {limits.max_stop_strings} stop strings are allowed", param="stop")
    for s in stops:
        if not s:
            raise bad_request("stop strings must not be empty", param="stop")
        if len(s) > limits.max_stop_len:
            raise bad_request(f"stop strings must be at most {limits.max_stop_len} characters", param="stop")
    return tuple(stops)


def _check_token_ids(ids: Sequence[int], limits: ApiLimits, param: str) -> None:
    for t in ids:
        if not 0 <= t < limits.vocab_size:
            raise bad_request(f"token id {t} is outside the vocabulary [0, {limits.vocab_size})", param=param)


def _common_params(req: _SamplingRequest, limits: ApiLimits) -> dict[str, Any]:
    if req.n > limits.max_n:
        raise bad_request(f"n must be at most {limits.max_n}", param="n")
    logit_bias = _logit_bias(req.logit_bias, limits)
    stop_token_ids = tuple(req.stop_token_ids or ())
    if len(stop_token_ids) > limits.max_stop_token_ids:
        raise bad_request(f"at most {limits.max_stop_token_ids} stop_token_ids are allowed", param="stop_token_ids")
    _check_token_ids(stop_token_ids, limits, "stop_token_ids")
    top_k = req.top_k if req.top_k is not None else 0
    temperature = req.temperature if req.temperature is not None else 1.0
    if 0.0 < temperature < MIN_TEMPERATURE:
        temperature = MIN_TEMPERATURE  # logits / 1e-300 overflow; vLLM clamps the same way
    return dict(
        temperature=temperature,
        top_p=req.top_p if req.top_p is not None else 1.0,
        top_k=max(top_k, 0),
        min_p=req.min_p if req.min_p is not None else 0.0,
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        repetition_penalty=req.repetition_penalty if req.repetition_penalty is not None else 1.0,
        seed=req.seed,
        stop=_stop_strings(req.stop, limits),
        stop_token_ids=stop_token_ids,
        ignore_eos=req.ignore_eos,
        logit_bias=logit_bias,
    )


def _logit_bias(bias: Mapping[str, float] | None, limits: ApiLimits) -> tuple[tuple[int, float], ...]:
    """OpenAI's logit_bias -> (token id, bias) pairs; values were range-checked by the request model."""
    if not bias:
        return ()
    if len(bias) > limits.max_logit_bias:
        raise bad_request(
            f"logit_bias may name at most {limits.max_logit_bias} tokens, got {len(bias)}", param="logit_bias"
        )
    out: dict[int, float] = {}
    for key, value in bias.items():
        if not (key.isascii() and key.isdigit()) or len(key) > 12:
            raise bad_request(f"logit_bias keys must be token ids (decimal integers), got {key!r}", param="logit_bias")
        t = int(key)
        if t >= limits.vocab_size:
            raise bad_request(
                f"logit_bias token id {t} is outside the vocabulary [0, {limits.vocab_size})", param="logit_bias"
            )
        if t in out:  # "07" and "7"
            raise bad_request(f"logit_bias names token {t} twice", param="logit_bias")
        out[t] = float(value)
    return tuple(sorted(out.items()))


def _sampling_params(common: dict[str, Any], **more: Any) -> SamplingParams:
    try:
        return SamplingParams(**common, **more)
    except ValueError as e:  # the checks above should make this unreachable
        raise bad_request(str(e)) from None


def _max_tokens(
    requested: int | None, prompt_lens: Sequence[int], limits: ApiLimits, param: str, prompt_param: str
) -> int:
    """Checks prompt lengths and the context budget; None means 'the rest of the context'."""
    longest = max(prompt_lens)
    if longest > limits.prompt_token_limit:
        raise bad_request(
            f"the prompt has {longest} tokens, more than the {limits.prompt_token_limit} allowed",
            param=prompt_param,
            code="context_length_exceeded",
        )
    room = limits.max_context_len - longest
    if requested is None:
        return room
    if requested > room:
        raise bad_request(
            f"this model's context is {limits.max_context_len} tokens; the prompt ({longest}) plus "
            f"{param} ({requested}) exceeds it",
            param=param,
            code="context_length_exceeded",
        )
    return requested


def _tokenize_prompts(
    prompt: str | list[str] | list[int] | list[list[int]], tokenizer: Tokenizer, limits: ApiLimits, add_bos: bool
) -> tuple[list[list[int]], list[str | None]]:
    if isinstance(prompt, str):
        texts: list[Any] = [prompt]
    elif len(prompt) == 0:
        raise bad_request("prompt must not be empty", param="prompt")
    elif isinstance(prompt[0], int):
        texts = [list(prompt)]
    else:
        texts = list(prompt)
    if len(texts) > limits.max_prompts:
        raise bad_request(f"at most {limits.max_prompts} prompts per request", param="prompt")
    ids_list: list[list[int]] = []
    originals: list[str | None] = []
    for p in texts:
        if isinstance(p, str):
            if len(p) > limits.max_body_bytes:  # cannot happen through HTTP; protects direct callers
                raise bad_request("prompt is too long", param="prompt", code="context_length_exceeded")
            ids = tokenizer.encode(p, add_special_tokens=False).ids
            if add_bos and (not ids or ids[0] != BOS_TOKEN_ID):
                ids = [BOS_TOKEN_ID, *ids]
            originals.append(p)
        else:
            ids = list(p)
            _check_token_ids(ids, limits, "prompt")
            originals.append(None)
        if not ids:
            raise bad_request("prompt must not be empty", param="prompt")
        ids_list.append(ids)
    return ids_list, originals


def prepare_completion(
    req: CompletionRequest, tokenizer: Tokenizer, limits: ApiLimits, add_bos: bool = False
) -> PreparedRequest:
    """Tokenizes a completions request and derives its `SamplingParams` (raises `ApiError`)."""
    common = _common_params(req, limits)
    if req.suffix:
        raise bad_request("suffix is not supported", param="suffix")
    if req.best_of is not None and req.best_of != req.n:
        raise bad_request("best_of other than n is not supported", param="best_of")
    if req.logprobs is not None and req.logprobs > limits.vocab_size:
        raise bad_request("logprobs exceeds the vocabulary size", param="logprobs")
    prompts, originals = _tokenize_prompts(req.prompt, tokenizer, limits, add_bos)
    if len(prompts) * req.n > limits.max_prompts:
        raise bad_request(f"prompts x n must be at most {limits.max_prompts}", param="n")
    prompt_only = req.max_tokens == 0
    if prompt_only and not req.echo:
        raise bad_request("max_tokens must be >= 1 (0 is only allowed with echo)", param="max_tokens")
    max_tokens = _max_tokens(
        None if prompt_only else req.max_tokens, [len(p) for p in prompts], limits, "max_tokens", "prompt"
    )
    if prompt_only:
        max_tokens = 1
    params = _sampling_params(
        common, max_tokens=max_tokens, logprobs=req.logprobs, prompt_logprobs=req.logprobs if req.echo else None
    )
    return PreparedRequest(
        prompts=prompts,
        prompt_texts=originals,
        params=params,
        n=req.n,
        stream=req.stream,
        include_usage=bool(req.stream_options and req.stream_options.include_usage),
        echo=req.echo,
        logprobs=req.logprobs,
        prompt_only=prompt_only,
    )


def chat_thinking(req: ChatCompletionRequest) -> bool:
    """Thinking mode, from any of ``chat_template_kwargs.thinking`` (or ``enable_thinking``), DeepSeek's
    ``thinking: {"type": ...}`` and ``reasoning_effort`` (``"none"`` is off, any other level on; V3.2 has
    no levels). Off when none is given; 400 when they disagree."""
    said: dict[str, bool] = {}
    kwargs = req.chat_template_kwargs or {}
    for key in ("thinking", "enable_thinking"):
        if key in kwargs:
            if not isinstance(kwargs[key], bool):
                raise bad_request(f"chat_template_kwargs.{key} must be a boolean", param="chat_template_kwargs")
            said[f"chat_template_kwargs.{key}"] = kwargs[key]
    if req.thinking is not None:
        said["thinking.type"] = req.thinking.type == "enabled"
    if req.reasoning_effort is not None:
        said["reasoning_effort"] = req.reasoning_effort != "none"
    if len(set(said.values())) > 1:
        raise bad_request(f"thinking mode is set both on and off: {said}", param=next(iter(said)))
    return any(said.values())


_JSON_TYPES = frozenset({"string", "number", "integer", "boolean", "array", "object", "null"})

TOOL_REQUIRED_INSTRUCTION = "You must call at least one of the functions above in this reply."
TOOL_NAMED_INSTRUCTION = 'You must call the function "{name}" in this reply.'
TOOL_SINGLE_INSTRUCTION = "Call at most one function in this reply."


@dataclass(frozen=True, slots=True)
class ToolPlan:
    """What a request's ``tools`` / ``tool_choice`` / ``parallel_tool_calls`` mean for this model.

    V3.2 cannot be constrained to call a tool, so ``required`` and a named function are instructions in
    the prompt (after the tools block; a named function is the only tool shown), and a reply without a
    call comes back as plain content with ``finish_reason: "stop"``. ``none`` leaves the tools out of the
    prompt and the output unparsed. ``parallel_tool_calls: false`` adds an instruction and keeps only the
    first call.
    """

    prompt_tools: list[dict[str, Any]] | None = None
    parse_tools: tuple[dict[str, Any], ...] | None = None
    instruction: str | None = None
    max_calls: int | None = None


def plan_tools(req: ChatCompletionRequest) -> ToolPlan:
    tools = [t.model_dump(exclude_none=True) for t in req.tools or ()]
    choice = req.tool_choice
    if not tools:
        if choice not in (None, "none", "auto"):
            raise bad_request("tool_choice requires tools", param="tool_choice")
        return ToolPlan()
    names = [t["function"]["name"] for t in tools]
    if len(set(names)) != len(names):
        raise bad_request("tool names must be unique", param="tools")
    if choice == "none":
        return ToolPlan()
    instructions = []
    shown = tools
    if choice == "required":
        instructions.append(TOOL_REQUIRED_INSTRUCTION)
    elif isinstance(choice, NamedToolChoice):
        name = choice.function.name
        if name not in names:
            raise bad_request(f"tool_choice names function {name!r}, which is not in tools", param="tool_choice")
        shown = [t for t in tools if t["function"]["name"] == name]
        instructions.append(TOOL_NAMED_INSTRUCTION.format(name=name))
    max_calls = None
    if req.parallel_tool_calls is False:
        instructions.append(TOOL_SINGLE_INSTRUCTION)
        max_calls = 1
    return ToolPlan(shown, tuple(tools), " ".join(instructions) or None, max_calls)


def _check_schema_types(schema: Any, path: str) -> None:
    if isinstance(schema, dict):
        t = schema.get("type")
        if t is not None:
            ts = t if isinstance(t, list) else [t]
            if not ts or any(not isinstance(x, str) or x not in _JSON_TYPES for x in ts):
                raise bad_request(f"{path}.type: {t!r} is not a JSON Schema type", param="response_format")
        for key, sub in schema.items():
            if key in ("properties", "$defs", "definitions", "patternProperties") and isinstance(sub, dict):
                for name, s in sub.items():
                    _check_schema_types(s, f"{path}.{key}.{name}")
            elif key in ("items", "additionalProperties", "not"):
                _check_schema_types(sub, f"{path}.{key}")
            elif key in ("anyOf", "oneOf", "allOf", "prefixItems") and isinstance(sub, list):
                for i, s in enumerate(sub):
                    _check_schema_types(s, f"{path}.{key}[{i}]")


def response_format_for_prompt(rf: ResponseFormat | None) -> dict[str, Any] | None:
    """The request's ``response_format`` as V3.2's encoder writes it into the system prompt (None: text).

    The model cannot be constrained to the schema: it is an instruction, as in DeepSeek's encoder.
    """
    if rf is None or rf.type == "text":
        return None
    if rf.type == "json_object":
        return {"type": "json_object"}
    if rf.json_schema is None:
        raise bad_request("response_format json_schema needs a json_schema object", param="response_format")
    if rf.json_schema.json_schema is not None:
        _check_schema_types(rf.json_schema.json_schema, "response_format.json_schema.schema")
    return rf.model_dump(by_alias=True, exclude_none=True)


def prepare_chat(
    req: ChatCompletionRequest, tokenizer: Tokenizer, limits: ApiLimits, chat_encoder: ChatEncoder = encode_messages
) -> PreparedRequest:
    """Renders the chat prompt, tokenizes it and derives its `SamplingParams` (raises `ApiError`)."""
    common = _common_params(req, limits)
    if req.top_logprobs is not None and not req.logprobs:
        raise bad_request("top_logprobs requires logprobs to be true", param="top_logprobs")
    messages = [m.model_dump(exclude_none=True) for m in req.messages]
    thinking = chat_thinking(req)
    plan = plan_tools(req)
    try:
        text = chat_encoder(
            messages,
            thinking=thinking,
            tools=plan.prompt_tools,
            response_format=response_format_for_prompt(req.response_format),
            tool_instruction=plan.instruction,
        )
    except ChatEncodingError as e:
        raise bad_request(str(e), param="messages") from None
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    if not ids:
        raise bad_request("the rendered prompt is empty", param="messages")
    requested = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    max_tokens = _max_tokens(requested, [len(ids)], limits, param, "messages")
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    params = _sampling_params(common, max_tokens=max_tokens, logprobs=logprobs)
    return PreparedRequest(
        prompts=[ids],
        prompt_texts=[text],
        params=params,
        n=req.n,
        stream=req.stream,
        include_usage=bool(req.stream_options and req.stream_options.include_usage),
        logprobs=logprobs,
        chat_output=ChatOutputOptions(thinking=thinking, tools=plan.parse_tools, max_calls=plan.max_calls),
    )
