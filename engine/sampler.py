"""Batched sampling from logits, one `SamplingParams` per row.

Pipeline (applied in this order, per row, to float32 logits of shape [B, V]):

0. logit bias (OpenAI `logit_bias`): ``logit[t] += bias[t]`` for the row's (token, bias) pairs;
1. repetition penalty (HF convention): for every token id seen in the prompt *or* the generated
   tokens, a positive logit is divided by the penalty and a non-positive one multiplied by it;
2. presence / frequency penalties (OpenAI convention), over generated tokens only:
   ``logit[t] -= presence * (count[t] > 0) + frequency * count[t]``;
3. temperature: ``logit / temperature`` (greedy rows, temperature 0, are left unscaled);
4. top-k: keep the k highest logits;
5. top-p: keep the minimal prefix of the (descending) sorted, renormalised distribution whose
   cumulative probability reaches p;
6. min-p: keep tokens whose probability is at least ``min_p * max_prob``;

then a token is drawn from ``softmax`` of the surviving logits (masked logits are ``-inf``).

Ties: top-k and top-p use one *stable* descending sort, so among equal logits the lower token id
ranks first. top-k therefore keeps exactly ``min(k, V)`` tokens, and top-p keeps exactly the
minimal prefix of that order. Greedy decoding (temperature 0) is ``argmax`` of the penalised
logits, returning the lowest token id among equal maxima; bias and penalties apply, truncation cannot
change the argmax. The processed distribution of a greedy row is the one-hot vector at that argmax.

Randomness: each request owns a `torch.Generator` (see `make_generator`). A sampled (non-greedy)
token is drawn by the exponential race ``argmax_t(prob[t] / E[t])`` with ``E ~ Exp(1)^V`` drawn
from that request's generator, which is exactly a draw from ``prob``. Each non-greedy step
therefore consumes exactly V exponentials of the row's generator, whatever the parameters or the
other rows; greedy steps consume none. The row's sample depends only on its own logits, params,
token history and generator state, never on the batch composition or order.

Logprobs: returned logprobs are ``log_softmax`` of the *biased* logits (step 0 only), before
penalties / temperature / truncation: the model's prediction with the request's `logit_bias` added,
as OpenAI reports logprobs after the bias (vLLM's default "raw logprobs" otherwise). So a request
without a bias gets the raw model logprobs, and the chosen token always has a finite logprob even
under top-k etc. The processed distribution is available separately (`processed_probs`). Prompt
logprobs (echo) are raw: the bias is about what the request samples, not about the prompt.

Cost: rows without a bias pay nothing (`biased_logits` returns its input when no row has one); a
biased batch costs one small host-to-device copy of the (row, token, bias) triples and one scatter.
"""

from __future__ import annotations

import itertools
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from splitserve.engine.sampling_params import SamplingParams, TokenLogprobs

__all__ = [
    "SamplingRow",
    "TokenLogprobs",
    "SampleOutput",
    "Sampler",
    "make_generator",
    "to_device",
    "to_host",
    "token_counts",
    "apply_logit_bias",
    "biased_logits",
    "apply_repetition_penalty",
    "apply_presence_frequency_penalties",
    "apply_temperature",
    "apply_top_k_top_p",
    "apply_top_k",
    "apply_top_p",
    "apply_min_p",
    "process_logits",
    "processed_probs",
    "exponential_noise",
    "sample_from_probs",
    "sample_tokens",
    "token_logprobs",
    "prompt_logprobs",
]

_MASK = float("-inf")
_SEED_MASK = (1 << 64) - 1


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device` without waiting for it: through pinned memory on CUDA (a copy from
    pageable memory may wait for the stream; PyTorch's pinned allocator keeps the buffer until the copy
    has run), t itself when it is already there."""
    if t.device == device:
        return t
    if device.type == "cuda" and t.device.type == "cpu":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


def to_host(t: torch.Tensor) -> torch.Tensor:
    """A host copy of t that does not wait for the device (pinned, non-blocking; valid once the device
    has run the copy); t itself on a CPU."""
    if t.device.type == "cpu":
        return t
    h = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    return h.copy_(t, non_blocking=True)


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    """A request's private generator on `device`, seeded with `seed` (any Python int, reduced
    modulo 2**64), or with a fresh random 63-bit seed when `seed` is None."""
    if seed is None:
        seed = secrets.randbits(63)
    g = torch.Generator(device=device)
    g.manual_seed(seed & _SEED_MASK)
    return g


@dataclass(slots=True)
class SamplingRow:
    """What the sampler needs to know about one row (= one request at one position).

    `generator` is the request's own generator (on the logits' device); it may be None only for
    greedy requests. `prompt_token_ids` feed the repetition penalty; `output_token_ids` (tokens
    generated so far, before the token being sampled) feed all three penalties.
    """

    params: SamplingParams
    generator: torch.Generator | None = None
    prompt_token_ids: Sequence[int] = ()
    output_token_ids: Sequence[int] = ()


@dataclass(frozen=True, slots=True)
class SampleOutput:
    """The sampled token of one row, with its logprobs when `params.logprobs` is not None."""

    token_id: int
    logprobs: TokenLogprobs | None = None


# ----------------------------------------------------------------------------------------------
# Elementary transforms. All take logits [B, V] float32 and per-row parameters as 1-D tensors of
# length B (on any device; moved to the logits' device), return a new tensor and never modify
# their inputs.
# ----------------------------------------------------------------------------------------------


def token_counts(
    token_ids: Sequence[Sequence[int]], vocab_size: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Per-row occurrence counts: [B, vocab_size] float32, counts[b, t] = #{i: token_ids[b][i] == t}.

    Ids are gathered on the host and copied once to `device`.
    """
    b = len(token_ids)
    counts = torch.zeros(b, vocab_size, dtype=torch.float32, device=device)
    lengths = np.fromiter((len(ids) for ids in token_ids), dtype=np.int64, count=b)
    total = int(lengths.sum())
    if total == 0:
        return counts
    flat = np.fromiter(itertools.chain.from_iterable(token_ids), dtype=np.int64, count=total)
    row_ids = np.repeat(np.arange(b, dtype=np.int64), lengths)
    idx = torch.from_numpy(np.stack([row_ids, flat])).to(device)
    counts.index_put_((idx[0], idx[1]), torch.ones(total, dtype=torch.float32, device=device), accumulate=True)
    return counts


def _col(
    values: torch.Tensor | Sequence[float] | Sequence[int], like: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """Per-row values as a [B, 1] column of `dtype` on `like`'s device (a host list travels by a
    non-blocking copy: building it never waits for the device)."""
    return to_device(torch.as_tensor(values, dtype=dtype), like.device).reshape(-1, 1)


def apply_logit_bias(logits: torch.Tensor, biases: Sequence[Sequence[tuple[int, float]]]) -> torch.Tensor:
    """OpenAI logit bias. logits [B, V] float; biases[b] = row b's (token id, bias) pairs (empty:
    none; ids distinct and in [0, V)). Returns ``logits + bias`` as a new tensor of the same dtype."""
    b, v = logits.shape
    if len(biases) != b:
        raise ValueError(f"{b} rows of logits but {len(biases)} bias lists")
    out = logits.clone()
    rows = [i for i, pairs in enumerate(biases) for _ in pairs]
    if not rows:
        return out
    toks = [t for pairs in biases for t, _ in pairs]
    if min(toks) < 0 or max(toks) >= v:
        raise ValueError(f"logit_bias token ids must lie in [0, {v})")
    vals = torch.tensor([x for pairs in biases for _, x in pairs], dtype=logits.dtype)
    idx = torch.tensor([rows, toks], dtype=torch.long)
    if logits.device.type != "cpu":
        idx, vals = to_device(idx, logits.device), to_device(vals, logits.device)
    out.index_put_((idx[0], idx[1]), vals, accumulate=True)
    return out


def biased_logits(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Step 0 alone: `logits` [B, V] with row b biased by ``params[b].logit_bias``, in float32.

    When no row has a bias this is `logits` itself (no copy, no cast): what greedy argmax shortcuts
    and logprobs read, so requests without a bias pay nothing."""
    if not any(p.logit_bias for p in params):
        return logits
    return apply_logit_bias(logits.to(torch.float32), [p.logit_bias for p in params])


def apply_repetition_penalty(
    logits: torch.Tensor, seen_mask: torch.Tensor, penalty: torch.Tensor | Sequence[float]
) -> torch.Tensor:
    """HF repetition penalty. logits [B, V] float; seen_mask [B, V] bool (token in prompt or
    output); penalty [B] float > 0. For seen tokens: ``l < 0 ? l * penalty : l / penalty``."""
    pen = _col(penalty, logits, logits.dtype)
    penalised = torch.where(logits < 0, logits * pen, logits / pen)
    return torch.where(seen_mask, penalised, logits)


def apply_presence_frequency_penalties(
    logits: torch.Tensor,
    output_counts: torch.Tensor,
    presence: torch.Tensor | Sequence[float],
    frequency: torch.Tensor | Sequence[float],
) -> torch.Tensor:
    """OpenAI penalties. logits [B, V]; output_counts [B, V] float (counts of *generated* tokens);
    presence, frequency [B]. ``l - presence * (count > 0) - frequency * count``."""
    pres = _col(presence, logits, logits.dtype)
    freq = _col(frequency, logits, logits.dtype)
    counts = output_counts.to(logits.dtype)
    return logits - pres * (counts > 0).to(logits.dtype) - freq * counts


def apply_temperature(logits: torch.Tensor, temperature: torch.Tensor | Sequence[float]) -> torch.Tensor:
    """``logits / temperature`` per row; rows with temperature 0 (greedy) are returned unscaled."""
    t = _col(temperature, logits, logits.dtype)
    return logits / torch.where(t > 0, t, torch.ones_like(t))


def apply_top_k_top_p(
    logits: torch.Tensor,
    top_k: torch.Tensor | Sequence[int] | None,
    top_p: torch.Tensor | Sequence[float] | None,
) -> torch.Tensor:
    """Top-k then top-p with one stable descending sort (ties: lower token id first).

    logits [B, V] float; top_k [B] int (<= 0 or >= V: no limit); top_p [B] float in (0, 1]
    (1: no limit). Top-k keeps the first k tokens of the sorted order. Top-p then keeps the
    minimal prefix of the sorted order whose cumulative (top-k renormalised) probability reaches
    top_p, i.e. token j (0-based, sorted) survives iff the probability mass strictly before it is
    < top_p. Dropped tokens get -inf.
    """
    b, v = logits.shape
    sorted_logits, sorted_idx = torch.sort(logits, dim=-1, descending=True, stable=True)
    pos = torch.arange(v, device=logits.device).expand(b, v)
    if top_k is not None:
        k = _col(top_k, logits, torch.long)
        k = torch.where((k <= 0) | (k > v), torch.full_like(k, v), k)
        sorted_logits = sorted_logits.masked_fill(pos >= k, _MASK)
    if top_p is not None:
        p = _col(top_p, logits, torch.float32)
        probs = torch.softmax(sorted_logits.float(), dim=-1)
        # Exclusive prefix sum: the mass strictly before each sorted position (0 for the first,
        # which therefore always survives).
        mass_before = torch.nn.functional.pad(torch.cumsum(probs, dim=-1)[:, :-1], (1, 0))
        drop_p = (mass_before >= p) & (p < 1.0)
        sorted_logits = sorted_logits.masked_fill(drop_p, _MASK)
    # scattered back whether or not anything was dropped (asking would wait for the device)
    return torch.empty_like(logits).scatter_(1, sorted_idx, sorted_logits)


def apply_top_k(logits: torch.Tensor, top_k: torch.Tensor | Sequence[int]) -> torch.Tensor:
    """Top-k only (see `apply_top_k_top_p`). logits [B, V]; top_k [B]."""
    return apply_top_k_top_p(logits, top_k, None)


def apply_top_p(logits: torch.Tensor, top_p: torch.Tensor | Sequence[float]) -> torch.Tensor:
    """Top-p only (see `apply_top_k_top_p`). logits [B, V]; top_p [B]."""
    return apply_top_k_top_p(logits, None, top_p)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor | Sequence[float]) -> torch.Tensor:
    """Min-p: drop (-inf) tokens with ``softmax(logits)[t] < min_p * max_t softmax(logits)``.

    logits [B, V] float; min_p [B] in [0, 1] (0: no cut). The most likely token always survives.
    """
    mp = _col(min_p, logits, torch.float32)
    probs = torch.softmax(logits.float(), dim=-1)
    drop = probs < mp * probs.max(dim=-1, keepdim=True).values
    return logits.masked_fill(drop, _MASK)


# ----------------------------------------------------------------------------------------------
# The pipeline.
# ----------------------------------------------------------------------------------------------


def _penalised(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """Steps 0-2 of the pipeline: [B, V] float32 (a new tensor)."""
    params = [r.params for r in rows]
    x = logits.to(torch.float32)
    x = apply_logit_bias(x, [p.logit_bias for p in params]) if any(p.logit_bias for p in params) else x.clone()
    v = x.shape[1]
    need_rep = [p.repetition_penalty != 1.0 for p in params]
    need_pf = [p.presence_penalty != 0.0 or p.frequency_penalty != 0.0 for p in params]
    if not any(need_rep) and not any(need_pf):
        return x
    # Generated-token counts, only for rows with some penalty (other rows stay untouched).
    out_counts = token_counts(
        [r.output_token_ids if (a or c) else () for r, a, c in zip(rows, need_rep, need_pf)], v, x.device
    )
    if any(need_rep):
        prompt_counts = token_counts([r.prompt_token_ids if a else () for r, a in zip(rows, need_rep)], v, x.device)
        seen = (prompt_counts > 0) | (out_counts > 0)
        x = apply_repetition_penalty(x, seen, [p.repetition_penalty for p in params])
    if any(need_pf):
        x = apply_presence_frequency_penalties(
            x, out_counts, [p.presence_penalty for p in params], [p.frequency_penalty for p in params]
        )
    return x


def _check(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> None:
    if logits.dim() != 2:
        raise ValueError(f"logits must be [B, V], got shape {tuple(logits.shape)}")
    if logits.shape[0] != len(rows):
        raise ValueError(f"{logits.shape[0]} rows of logits but {len(rows)} SamplingRows")


def process_logits(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """Run the whole pipeline: logits [B, V] (any float dtype) -> processed logits [B, V] float32.

    Non-greedy rows: biased, penalised, temperature-scaled, with tokens cut by top-k / top-p / min-p set
    to -inf. Greedy rows: biased and penalised logits only (truncation would not change their argmax).
    """
    _check(logits, rows)
    x = _penalised(logits, rows)
    params = [r.params for r in rows]
    sampled = [not p.greedy for p in params]
    if not any(sampled):
        return x
    x = apply_temperature(x, [p.temperature for p in params])
    need_k = any(s and p.top_k > 0 for s, p in zip(sampled, params))
    need_p = any(s and p.top_p < 1.0 for s, p in zip(sampled, params))
    if need_k or need_p:
        ks = [p.top_k if s else 0 for s, p in zip(sampled, params)]
        ps = [p.top_p if s else 1.0 for s, p in zip(sampled, params)]
        x = apply_top_k_top_p(x, ks if need_k else None, ps if need_p else None)
    if any(s and p.min_p > 0.0 for s, p in zip(sampled, params)):
        x = apply_min_p(x, [p.min_p if s else 0.0 for s, p in zip(sampled, params)])
    return x


def processed_probs(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """The final distribution each row samples from: [B, V] float32, rows sum to 1.

    ``softmax(process_logits(...))`` for sampled rows; for greedy rows the one-hot vector at the
    argmax (lowest id among ties) of the biased, penalised logits. This is the `p` (target) and `q`
    (draft) of speculative decoding.
    """
    x = process_logits(logits, rows)
    probs = torch.softmax(x, dim=-1)
    flags = [r.params.greedy for r in rows]
    if any(flags):  # decided on the host: nothing here waits for the device
        greedy = to_device(torch.tensor(flags, dtype=torch.bool), x.device)
        onehot = torch.zeros_like(probs).scatter_(1, x.argmax(dim=-1, keepdim=True), 1.0)
        probs = torch.where(greedy[:, None], onehot, probs)
    return probs


def exponential_noise(
    generators: Sequence[torch.Generator | None], vocab_size: int, device: torch.device | str
) -> torch.Tensor:
    """[B, V] float32: row b is V fresh Exp(1) draws from generators[b], or all ones when
    generators[b] is None (greedy rows consume no randomness). Draws are clamped away from 0."""
    rows = []
    for g in generators:
        if g is None:
            rows.append(torch.ones(vocab_size, dtype=torch.float32, device=device))
        else:
            e = torch.empty(vocab_size, dtype=torch.float32, device=device).exponential_(generator=g)
            rows.append(e.clamp_min_(torch.finfo(torch.float32).tiny))
    if not rows:
        return torch.empty(0, vocab_size, dtype=torch.float32, device=device)
    return torch.stack(rows)


def sample_from_probs(probs: torch.Tensor, generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """Exponential-race draw from each row of `probs` [B, V] (non-negative, need not be
    normalised): ``argmax(probs / E)``, E drawn per row from its own generator. Rows whose
    generator is None take ``argmax(probs)`` and consume nothing. Returns [B] int64."""
    if len(generators) != probs.shape[0]:
        raise ValueError("one generator (or None) per row")
    noise = exponential_noise(generators, probs.shape[1], probs.device)
    return (probs / noise).argmax(dim=-1)


def _generators_for(rows: Sequence[SamplingRow]) -> list[torch.Generator | None]:
    gens: list[torch.Generator | None] = []
    for r in rows:
        if r.params.greedy:
            gens.append(None)
        elif r.generator is None:
            raise ValueError("a non-greedy row needs its request's torch.Generator")
        else:
            gens.append(r.generator)
    return gens


def sample_tokens(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """Sample one token per row: logits [B, V] -> token ids [B] int64 (on the logits' device).

    Non-greedy rows advance their generator by exactly V exponentials; greedy rows take the
    argmax of the biased, penalised logits and use no randomness.
    """
    return sample_from_probs(processed_probs(logits, rows), _generators_for(rows))


def token_logprobs(
    logits: torch.Tensor, token_ids: torch.Tensor | Sequence[int], num_top: Sequence[int | None]
) -> list[TokenLogprobs | None]:
    """Logprobs (``log_softmax(logits)``, no sampling transforms) of chosen tokens.

    logits [B, V], as the caller wants them reported (pass `biased_logits(...)` for a request's
    reported logprobs: after its logit_bias); token_ids [B] int; num_top[b] = N alternatives for row b, or None for no
    logprobs (entry None). Ties among the top-N alternatives are ordered by `torch.topk`.
    """
    b, v = logits.shape
    wanted = [i for i, n in enumerate(num_top) if n is not None]
    out: list[TokenLogprobs | None] = [None] * b
    if not wanted:
        return out
    idx = torch.tensor(wanted, dtype=torch.long, device=logits.device)
    lp = torch.log_softmax(logits.index_select(0, idx).to(torch.float32), dim=-1)
    toks = torch.as_tensor(token_ids, dtype=torch.long, device=logits.device).index_select(0, idx)
    chosen = lp.gather(1, toks[:, None]).squeeze(1).tolist()
    toks_l = toks.tolist()
    max_n = min(max(int(num_top[i]) for i in wanted), v)  # type: ignore[arg-type]
    top_lp_l: list[list[float]] = []
    top_id_l: list[list[int]] = []
    if max_n > 0:
        top_lp, top_id = torch.topk(lp, max_n, dim=-1)
        top_lp_l, top_id_l = top_lp.tolist(), top_id.tolist()
    for j, i in enumerate(wanted):
        n = min(int(num_top[i]), v)  # type: ignore[arg-type]
        top = list(zip(top_id_l[j][:n], top_lp_l[j][:n])) if n > 0 else []
        out[i] = TokenLogprobs(int(toks_l[j]), float(chosen[j]), top)
    return out


def prompt_logprobs(logits: torch.Tensor, prompt_ids: Sequence[int], n: int) -> list[TokenLogprobs | None]:
    """Echo logprobs of a prompt: entry 0 is None (no prefix); entry j >= 1 is the raw logprob of
    prompt_ids[j] under ``log_softmax(logits[j - 1])`` with the top-n alternatives of that
    position.

    logits [S, V] with S >= len(prompt_ids) - 1, row i being the model's prediction after prompt
    tokens 0..i (a full prefill gives S = len(prompt_ids); the extra last row is unused).
    Returns len(prompt_ids) entries.
    """
    m = len(prompt_ids)
    if m == 0:
        return []
    if logits.dim() != 2 or logits.shape[0] < m - 1:
        raise ValueError(f"need logits [>= {m - 1}, V], got {tuple(logits.shape)}")
    rest = token_logprobs(logits[: m - 1], list(prompt_ids[1:]), [n] * (m - 1))
    return [None, *rest]


class Sampler:
    """Batched sampler: the pipeline above, then one token per row, plus optional logprobs.

    Stateless; the per-request state (generator, token history) lives in the `SamplingRow`s.
    """

    def process_logits(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
        """See module-level `process_logits`: [B, V] -> [B, V] float32."""
        return process_logits(logits, rows)

    def processed_probs(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
        """See module-level `processed_probs`: [B, V] -> [B, V] float32 distributions."""
        return processed_probs(logits, rows)

    def sample_tokens(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
        """See module-level `sample_tokens`: [B, V] -> [B] int64, no host sync."""
        return sample_tokens(logits, rows)

    def sample(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> list[SampleOutput]:
        """Sample one token per row and return plain data: token id and, where
        `params.logprobs` is not None, the logprob of the token (after the row's logit_bias, before
        anything else) and its top-N alternatives. logits [B, V] float."""
        tokens = sample_tokens(logits, rows)
        wanted = [r.params.logprobs for r in rows]
        lps: list[TokenLogprobs | None] = [None] * len(rows)
        if any(n is not None for n in wanted):
            lps = token_logprobs(biased_logits(logits, [r.params for r in rows]), tokens, wanted)
        return [SampleOutput(int(t), lp) for t, lp in zip(tokens.tolist(), lps)]

    @staticmethod
    def prompt_logprobs(logits: torch.Tensor, prompt_ids: Sequence[int], n: int) -> list[TokenLogprobs | None]:
        """See module-level `prompt_logprobs`."""
        return prompt_logprobs(logits, prompt_ids, n)
