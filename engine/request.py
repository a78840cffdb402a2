"""A request inside the engine: its tokens, its progress counters and its block table.

Progress is counters catching up (no prefill/decode phase flag):
  num_computed  tokens of `all_ids` whose main-model cache entries are in the blocks;
  mtp_computed  tokens whose MTP-layer cache entries are in the blocks (MTP on only);
  pending_hidden  main-model hidden states of positions [mtp_computed, num_computed), what the
                MTP layer needs to catch up.
A step computes `all_ids[num_computed:]` (in chunks); when it reaches the end of the known tokens
the next token is sampled. Drafts (MTP) ride along with the last known token in a decode step.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from .sampler import TokenLogprobs
from .sampling_params import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    generator: torch.Generator | None = None
    arrival: float = field(default_factory=time.monotonic)
    # When set, the request stops after its first sampled token and keeps its blocks until the
    # owner releases them (a prefill worker that still has to send the cache).
    prefill_only: bool = False

    output_ids: list[int] = field(default_factory=list)
    output_logprobs: list[TokenLogprobs] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    status: Status = Status.WAITING
    finish_reason: str | None = None

    block_table: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)  # keys of the leading registered blocks
    num_computed: int = 0
    mtp_computed: int = 0
    pending_hidden: torch.Tensor | None = None
    drafts: list[int] = field(default_factory=list)
    draft_probs: torch.Tensor | None = None  # [k, V] distributions the drafts were sampled from
    num_cached_prompt: int = 0  # prompt tokens served from the prefix cache
    num_preemptions: int = 0
    draft_tokens: int = 0  # drafts proposed over the request's life
    accepted_draft_tokens: int = 0
    thinking: bool = False  # inside <think>...</think> after all_ids[:think_scanned] (relaxed MTP acceptance)
    think_scanned: int = 0
    first_token_time: float | None = None
    _prompt_logits: list[torch.Tensor] = field(default_factory=list)

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is Status.FINISHED

    @property
    def in_decode(self) -> bool:
        """All known tokens but the last are computed and at least one token has been sampled."""
        return bool(self.output_ids) and self.num_computed == self.num_tokens - 1


@dataclass
class RequestOutput:
    """What one step produced for one request."""

    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprobs] | None
    finished: bool
    finish_reason: str | None
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    num_cached_prompt: int = 0
    draft_tokens: int = 0
    accepted_draft_tokens: int = 0
