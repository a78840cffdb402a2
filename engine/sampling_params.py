"""Per-request sampling parameters, shared by the engine, the workers and the router.

The router builds a `SamplingParams` from an OpenAI request (after validating it); the workers
carry it over gRPC; the engine's sampler reads it. Defaults are the OpenAI API's defaults, not
protobuf's zero values.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class TokenLogprobs:
    """Raw logprob of one token and the top-N alternatives of its position.

    `top` holds (token id, logprob) pairs by decreasing logprob, N of them (N = requested count,
    or fewer if the vocabulary is smaller).
    """

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How one request samples its tokens.

    temperature 0 means greedy (argmax). top_k <= 0 means no top-k limit; top_p 1.0 and min_p 0.0
    mean no nucleus / min-p cut. Penalties follow the OpenAI (presence/frequency, additive on
    logits of tokens already generated) and HF (repetition, multiplicative over prompt and
    generated tokens) conventions. `seed` makes the request's samples reproducible whatever else
    is batched with it. `logprobs` is the number of top alternatives returned per generated token
    (None: no logprobs); `prompt_logprobs` the same for prompt tokens (echo).
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

    def __post_init__(self) -> None:
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
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0
