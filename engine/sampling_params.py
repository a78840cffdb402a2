"""Per-request sampling parameters, shared by the engine, the workers and the router.

The router builds a `SamplingParams` from an OpenAI request (after validating it); the workers
carry it over gRPC; the engine's sampler reads it. Defaults are the OpenAI API's defaults, not
protobuf's zero values.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class TokenLogprobs:
    """Logprob of one token (after its request's logit_bias) and the top-N alternatives of its position.

    `top` holds (token id, logprob) pairs by decreasing logprob, N of them (N = requested count,
    or fewer if the vocabulary is smaller).
    """

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


#: OpenAI's range for one logit_bias value.
MAX_LOGIT_BIAS = 100.0


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How one request samples its tokens.

    temperature 0 means greedy (argmax). top_k <= 0 means no top-k limit; top_p 1.0 and min_p 0.0
    mean no nucleus / min-p cut. Penalties follow the OpenAI (presence/frequency, additive on
    logits of tokens already generated) and HF (repetition, multiplicative over prompt and
    generated tokens) conventions. `seed` makes the request's samples reproducible whatever else
    is batched with it. `logprobs` is the number of top alternatives returned per generated token
    (None: no logprobs); `prompt_logprobs` the same for prompt tokens (echo).

    `logit_bias` (OpenAI): (token id, bias) pairs, bias in [-100, 100], added to the model's logits
    before anything else (penalties, temperature, truncation, greedy argmax). Given as a mapping or
    pairs, it is stored as a tuple sorted by token id (hashable, one canonical form); ids must be
    distinct and >= 0 (the engine checks them against its vocabulary).
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    max_tokens: int = 16
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    logit_bias: tuple[tuple[int, float], ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "logit_bias", _canonical_logit_bias(self.logit_bias))
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and v < 0:
                raise ValueError(f"{name} must be >= 0, got {v}")

    @property
    def has_logit_bias(self) -> bool:
        return bool(self.logit_bias)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0


def _canonical_logit_bias(
    bias: Mapping[int, float] | Iterable[tuple[int, float]] | None,
) -> tuple[tuple[int, float], ...]:
    """`bias` as a tuple of (int id, float bias) sorted by id; ValueError on a bad entry."""
    if not bias:
        return ()
    pairs = list(bias.items()) if isinstance(bias, Mapping) else list(bias)
    out: dict[int, float] = {}
    for pair in pairs:
        try:
            tok, val = pair
        except (TypeError, ValueError):
            raise ValueError(f"logit_bias entries must be (token id, bias) pairs, got {pair!r}") from None
        if isinstance(tok, bool) or not isinstance(tok, int) or tok < 0:
            raise ValueError(f"logit_bias token ids must be integers >= 0, got {tok!r}")
        if isinstance(val, bool) or not isinstance(val, (int, float)):
            raise ValueError(f"logit_bias values must be numbers, got {val!r} for token {tok}")
        val = float(val)
        if not (math.isfinite(val) and -MAX_LOGIT_BIAS <= val <= MAX_LOGIT_BIAS):
            raise ValueError(f"logit_bias values must be in [-100, 100], got {val} for token {tok}")
        if tok in out:
            raise ValueError(f"logit_bias names token {tok} twice")
        out[int(tok)] = val
    return tuple(sorted(out.items()))
