"""OpenAI response bodies and SSE chunks for /v1/completions and /v1/chat/completions."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from tokenizers import Tokenizer

from splitserve.model.tokenizer import TextDecoder, TokenBytes, token_text
from splitserve.router.backend import TokenLogprobs
from splitserve.router.generation import Piece

SSE_DONE = "data: [DONE]\n\n"


def sse(obj: dict[str, Any]) -> str:
    """One SSE event. ASCII-only JSON: a raw U+2028, U+2029 or U+0085 (which model output holds) would
    split the event for every client that splits lines like str.splitlines (httpx.iter_lines, requests)."""
    return f"data: {json.dumps(obj, ensure_ascii=True, separators=(',', ':'))}\n\n"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


class TokenStrings:
    """Display strings and bytes of tokens, cached (OpenAI's ``bytes:\\x..`` form for partial characters)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._bytes = TokenBytes.shared(tokenizer, skip_special_tokens=True) if TokenBytes.supports(tokenizer) else None
        self._cache: dict[int, tuple[str, bytes]] = {}

    def get(self, token_id: int) -> tuple[str, bytes]:
        v = self._cache.get(token_id)
        if v is None:
            v = token_text(self._tokenizer, self._bytes, token_id)
            self._cache[token_id] = v
        return v

    def text(self, token_id: int) -> str:
        return self.get(token_id)[0]


def echo_prompt(
    prompt_ids: Sequence[int],
    prompt_text: str | None,
    prompt_logprobs: Sequence[TokenLogprobs | None] | None,
    tokenizer: Tokenizer,
) -> tuple[str, list[Piece]]:
    """The echoed prompt text and one `Piece` per prompt token (offsets into that text)."""
    decoder = TextDecoder(tokenizer, skip_special_tokens=False)
    pieces = []
    for i, tok in enumerate(prompt_ids):
        offset = len(decoder.text)
        decoder.add([tok])
        lp = prompt_logprobs[i] if prompt_logprobs is not None and i < len(prompt_logprobs) else None
        pieces.append(Piece(tok, lp, offset))
    decoder.finish()
    return (prompt_text if prompt_text is not None else decoder.text), pieces


def completion_logprobs(
    pieces: Sequence[Piece], strings: TokenStrings, base_offset: int, text_len: int | None = None
) -> dict[str, list[Any]]:
    """The completions ``logprobs`` object. A piece without logprobs (the first prompt token) gets null.

    ``top_logprobs`` holds the requested alternatives plus the chosen token (as the OpenAI API does).
    """
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    text_offset: list[int] = []
    for p in pieces:
        tokens.append(strings.text(p.token_id))
        off = p.offset if text_len is None else min(p.offset, text_len)
        text_offset.append(base_offset + off)
        if p.logprobs is None:
            token_logprobs.append(None)
            top_logprobs.append(None)
            continue
        token_logprobs.append(p.logprobs.logprob)
        top: dict[str, float] = {}
        for tid, lp in p.logprobs.top:
            top.setdefault(strings.text(tid), lp)
        top.setdefault(tokens[-1], p.logprobs.logprob)
        top_logprobs.append(top)
    return {
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": top_logprobs,
        "text_offset": text_offset,
    }


def chat_logprobs(pieces: Sequence[Piece], strings: TokenStrings) -> dict[str, list[dict[str, Any]]]:
    """The chat ``logprobs`` object: ``{"content": [{token, logprob, bytes, top_logprobs}]}``."""
    content = []
    for p in pieces:
        if p.logprobs is None:
            continue
        text, raw = strings.get(p.token_id)
        top = []
        for tid, lp in p.logprobs.top:
            t, b = strings.get(tid)
            top.append({"token": t, "logprob": lp, "bytes": list(b)})
        content.append({"token": text, "logprob": p.logprobs.logprob, "bytes": list(raw), "top_logprobs": top})
    return {"content": content}


def completion_body(
    request_id: str, created: int, model: str, choices: list[dict[str, Any]], usage_: dict[str, int]
) -> dict[str, Any]:
    return {
        "id": request_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": usage_,
    }


def completion_choice(
    index: int, text: str, logprobs: dict[str, Any] | None, finish_reason: str | None
) -> dict[str, Any]:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def completion_chunk(
    request_id: str, created: int, model: str, choice: dict[str, Any], include_usage: bool
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": request_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [choice],
    }
    if include_usage:
        body["usage"] = None
    return body


def chat_body(
    request_id: str, created: int, model: str, choices: list[dict[str, Any]], usage_: dict[str, int]
) -> dict[str, Any]:
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": usage_,
    }


def chat_choice(
    index: int, message: dict[str, Any], logprobs: dict[str, Any] | None, finish_reason: str | None
) -> dict[str, Any]:
    """`message` as `splitserve.router.chat_output.chat_message` builds it."""
    return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish_reason}


def chat_chunk(
    request_id: str,
    created: int,
    model: str,
    index: int,
    delta: dict[str, Any],
    logprobs: dict[str, Any] | None,
    finish_reason: str | None,
    include_usage: bool,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": request_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}],
    }
    if include_usage:
        body["usage"] = None
    return body


def usage_chunk(request_id: str, created: int, model: str, obj: str, usage_: dict[str, int]) -> dict[str, Any]:
    return {"id": request_id, "object": obj, "created": created, "model": model, "choices": [], "usage": usage_}
