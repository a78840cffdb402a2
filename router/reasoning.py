"""Splitting DeepSeek-V3.2's thinking-mode output into reasoning and answer.

In thinking mode the prompt ends with ``<think>`` (spec §12.2), so the model writes its reasoning first,
then ``</think>``, then the answer (and any tool calls). Everything before the first ``</think>`` is
``reasoning_content``; everything after it is ``content``. A generation that stops before ``</think>``
(max_tokens, a stop string) is all reasoning. In chat (non-thinking) mode the prompt already ends with
``</think>``: there is no reasoning and the text is returned unchanged.

`split_reasoning` parses a whole output; `ReasoningStream` does the same incrementally, holding back a
tail that could be the start of ``</think>``, so that for every split of a text into chunks the
concatenated deltas equal `split_reasoning`'s result.
"""

from __future__ import annotations

from dataclasses import dataclass

from splitserve.model.tokenizer import THINK_END_TOKEN


def partial_suffix(text: str, marker: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `marker` (0 if none)."""
    for n in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


def split_reasoning(text: str, thinking: bool) -> tuple[str | None, str]:
    """``(reasoning, content)`` of a whole output; reasoning is None outside thinking mode."""
    if not thinking:
        return None, text
    reasoning, sep, content = text.partition(THINK_END_TOKEN)
    return reasoning, content if sep else ""


@dataclass(slots=True)
class ReasoningDelta:
    reasoning: str = ""
    content: str = ""


class ReasoningStream:
    """Incremental `split_reasoning`: ``feed`` text deltas, then ``finish`` once."""

    def __init__(self, thinking: bool) -> None:
        self.thinking = thinking
        self._in_reasoning = thinking
        self._held = ""  # a tail of reasoning that may be the start of </think>

    def feed(self, text: str) -> ReasoningDelta:
        if not self._in_reasoning:
            return ReasoningDelta(content=text)
        buf = self._held + text
        reasoning, sep, content = buf.partition(THINK_END_TOKEN)
        if sep:
            self._in_reasoning = False
            self._held = ""
            return ReasoningDelta(reasoning=reasoning, content=content)
        keep = partial_suffix(buf, THINK_END_TOKEN)
        self._held = buf[len(buf) - keep :] if keep else ""
        return ReasoningDelta(reasoning=buf[: len(buf) - keep])

    def finish(self) -> ReasoningDelta:
        """The held-back tail (the output ended inside the reasoning)."""
        held, self._held = self._held, ""
        return ReasoningDelta(reasoning=held)
