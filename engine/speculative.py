"""Verification step of MTP speculative decoding (lossless).

For one request: k draft tokens d_1..d_k, sampled from draft distributions q_1..q_k (None: greedy
drafting, i.e. q_i is one-hot at d_i), and the target model's *processed* distributions
p_1..p_{k+1} at those positions (target logits through the same sampler pipeline,
`splitserve.engine.sampler.processed_probs`, with the accepted-draft history feeding the
penalties: see `target_probs_for_drafts`). The result is the accepted prefix length n and the
n + 1 tokens to emit: d_1..d_n plus one correction (on rejection) or bonus (all accepted) token.

* Greedy requests (temperature 0): accept while d_i == argmax p_i (lowest id among ties, as the
  sampler's greedy decoding), then emit argmax p_{n+1}. Token for token identical to plain greedy
  decoding, and no randomness is used.
* Sampling requests: rejection sampling of Leviathan et al. (2023) / Chen et al. (2023). Draw
  u_i ~ U[0, 1) and accept d_i iff ``u_i * q_i(d_i) < p_i(d_i)`` (probability
  min(1, p_i(d_i) / q_i(d_i)); a draft with q_i(d_i) == 0, which exact sampling cannot produce,
  is accepted iff p_i(d_i) > 0). At the first rejection i, emit a draw from
  norm(max(0, p_i - q_i)); if all k are accepted, a draw from p_{k+1}. For one-hot q_i the same
  rule reads: accept with probability p_i(d_i); the residual is p_i with d_i zeroed. The emitted
  tokens are distributed exactly as sequential sampling from the p's.

Randomness comes from the request's generator and its consumption is fixed per step: exactly k
uniforms (drawn first, all of them, whatever is accepted) and then V exponentials for the
correction / bonus token, drawn by the same exponential race as the sampler. With k = 0 a step
is therefore identical to `sampler.sample_from_probs` on p_1.

Batched verification over requests with different k works on padded tensors
(`verify_padded`) or lists (`verify_batch`); only the random draws are done per row.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from splitserve.engine.sampler import SamplingRow, exponential_noise, processed_probs

__all__ = [
    "VerifyResult",
    "verify_padded",
    "verify_batch",
    "verify",
    "target_probs_for_drafts",
]


@dataclass(frozen=True, slots=True)
class VerifyResult:
    """Outcome for one request: `num_accepted` drafts accepted (0..k) and `tokens` to emit,
    ``tokens == drafts[:num_accepted] + [correction or bonus token]`` (num_accepted + 1 ids)."""

    num_accepted: int
    tokens: list[int]


def verify_padded(
    draft_token_ids: torch.Tensor,
    num_draft_tokens: torch.Tensor,
    target_probs: torch.Tensor,
    draft_probs: torch.Tensor | None,
    generators: Sequence[torch.Generator | None],
    greedy: torch.Tensor,
    draft_onehot: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Verify a padded batch of B requests with up to K drafts each.

    Args:
        draft_token_ids: [B, K] int64; row b's drafts in [:num_draft_tokens[b]], rest ignored.
        num_draft_tokens: [B] int64, k_b in 0..K.
        target_probs: [B, K + 1, V] float, processed target distributions p_1..p_{K+1}; row b
            uses positions 0..k_b.
        draft_probs: [B, K, V] float draft distributions q_1..q_K, or None when every row
            drafted greedily (all q one-hot).
        generators: B entries, each the request's generator (on the tensors' device); None is
            allowed (and ignored) for greedy rows.
        greedy: [B] bool, the request decodes greedily (temperature 0).
        draft_onehot: [B] bool, row b's q is one-hot at its drafts (greedy drafting); its
            `draft_probs` row is then ignored. None: all True if draft_probs is None, else all
            False.

    Returns:
        num_accepted [B] int64, and tokens [B, K + 1] int64 with row b's emitted tokens in
        [:num_accepted[b] + 1] and -1 after.
    """
    if draft_token_ids.dim() != 2 or target_probs.dim() != 3:
        raise ValueError("draft_token_ids must be [B, K] and target_probs [B, K + 1, V]")
    b, k_max = draft_token_ids.shape
    if target_probs.shape[0] != b or target_probs.shape[1] != k_max + 1:
        raise ValueError(f"target_probs {tuple(target_probs.shape)} does not match drafts {(b, k_max)}")
    if len(generators) != b:
        raise ValueError("one generator (or None) per row")
    dev = target_probs.device
    v = target_probs.shape[2]
    p_all = target_probs.to(torch.float32)
    k = num_draft_tokens.to(device=dev, dtype=torch.long)
    greedy = greedy.to(device=dev, dtype=torch.bool)
    if draft_onehot is None:
        draft_onehot = torch.full((b,), draft_probs is None, dtype=torch.bool, device=dev)
    onehot = draft_onehot.to(device=dev, dtype=torch.bool)
    if draft_probs is None and not bool(onehot.all()):
        raise ValueError("draft_probs is needed for rows whose draft is not one-hot")
    if k.shape != (b,) or (b > 0 and (int(k.max()) > k_max or int(k.min()) < 0)):
        raise ValueError("num_draft_tokens must lie in 0..K")

    pos = torch.arange(k_max, device=dev)
    valid = pos[None, :] < k[:, None]  # [B, K]
    d = torch.where(valid, draft_token_ids.to(device=dev, dtype=torch.long), 0)  # padding -> 0
    if bool(((d < 0) | (d >= v)).any()):
        raise ValueError(f"draft token ids must lie in 0..{v - 1}")

    # Random draws, per row from its own generator: k_b uniforms, then V exponentials.
    uniforms = torch.zeros(b, k_max, dtype=torch.float32, device=dev)
    k_list = k.tolist()
    greedy_list = greedy.tolist()
    row_gens: list[torch.Generator | None] = []
    for i in range(b):
        g = None if greedy_list[i] else generators[i]
        if not greedy_list[i] and g is None:
            raise ValueError(f"row {i} samples but has no generator")
        if g is not None and k_list[i] > 0:
            uniforms[i, : k_list[i]] = torch.rand(k_list[i], generator=g, device=dev)
        row_gens.append(g)
    noise = exponential_noise(row_gens, v, dev)  # [B, V]; ones for greedy rows

    # Acceptance of each draft position.
    p_draft = p_all[:, :k_max]  # [B, K, V]
    p_d = p_draft.gather(2, d[..., None]).squeeze(2)  # [B, K]
    if draft_probs is not None:
        q_d = draft_probs.to(device=dev, dtype=torch.float32).gather(2, d[..., None]).squeeze(2)
        q_d = torch.where(onehot[:, None], torch.ones_like(q_d), q_d)
    else:
        q_d = torch.ones_like(p_d)
    accept_sampled = uniforms * q_d < p_d
    accept_greedy = d == p_draft.argmax(dim=2)
    accept = torch.where(greedy[:, None], accept_greedy, accept_sampled) & valid
    n = torch.cumprod(accept.to(torch.long), dim=1).sum(dim=1)  # [B] accepted prefix length

    # Correction (rejected at position n) or bonus (n == k) token.
    rows = torch.arange(b, device=dev)
    p_n = p_all[rows, n]  # [B, V]
    rejected = (n < k) & ~greedy
    weights = p_n
    if bool(rejected.any()):
        n_q = n.clamp(max=max(k_max - 1, 0))
        d_n = d[rows, n_q] if k_max > 0 else torch.zeros_like(n)
        residual_onehot = p_n.scatter(1, d_n[:, None], 0.0)
        if draft_probs is not None:
            q_n = draft_probs.to(device=dev, dtype=torch.float32)[rows, n_q]
            residual = torch.where(onehot[:, None], residual_onehot, (p_n - q_n).clamp_min(0.0))
        else:
            residual = residual_onehot
        # A residual with no mass can only come from rounding (p == q cannot reject): use p.
        residual = torch.where(residual.sum(dim=1, keepdim=True) > 0, residual, p_n)
        weights = torch.where(rejected[:, None], residual, p_n)
    bonus = torch.where(greedy, p_n.argmax(dim=1), (weights / noise).argmax(dim=1))

    tokens = torch.full((b, k_max + 1), -1, dtype=torch.long, device=dev)
    if k_max > 0:
        tokens[:, :k_max] = torch.where(pos[None, :] < n[:, None], d, torch.full_like(d, -1))
    tokens[rows, n] = bonus
    return n, tokens


def verify_batch(
    draft_token_ids: Sequence[Sequence[int]],
    draft_probs: Sequence[torch.Tensor | None],
    target_probs: Sequence[torch.Tensor],
    generators: Sequence[torch.Generator | None],
    greedy: Sequence[bool],
) -> list[VerifyResult]:
    """Verify B requests with possibly different k.

    Args:
        draft_token_ids: per request, its k_b draft tokens.
        draft_probs: per request, [k_b, V] float draft distributions, or None (greedy drafting:
            one-hot at the drafts).
        target_probs: per request, [k_b + 1, V] float processed target distributions.
        generators: per request, its generator (None allowed for greedy requests).
        greedy: per request, whether it decodes greedily.
    """
    b = len(draft_token_ids)
    if not (len(draft_probs) == len(target_probs) == len(generators) == len(greedy) == b):
        raise ValueError("all per-request sequences must have the same length")
    if b == 0:
        return []
    v = target_probs[0].shape[-1]
    dev = target_probs[0].device
    ks = [len(x) for x in draft_token_ids]
    k_max = max(ks)
    d = torch.zeros(b, k_max, dtype=torch.long)
    p = torch.zeros(b, k_max + 1, v, dtype=torch.float32, device=dev)
    q = None
    if any(x is not None for x in draft_probs):
        q = torch.zeros(b, k_max, v, dtype=torch.float32, device=dev)
    for i in range(b):
        if target_probs[i].shape != (ks[i] + 1, v):
            raise ValueError(
                f"request {i}: target_probs must be [{ks[i] + 1}, {v}], got {tuple(target_probs[i].shape)}"
            )
        d[i, : ks[i]] = torch.as_tensor(list(draft_token_ids[i]), dtype=torch.long)
        p[i, : ks[i] + 1] = target_probs[i]
        qi = draft_probs[i]
        if qi is not None:
            if qi.shape != (ks[i], v):
                raise ValueError(f"request {i}: draft_probs must be [{ks[i]}, {v}], got {tuple(qi.shape)}")
            assert q is not None
            q[i, : ks[i]] = qi
    onehot = torch.tensor([x is None for x in draft_probs], dtype=torch.bool, device=dev)
    n, tokens = verify_padded(
        d.to(dev),
        torch.tensor(ks, dtype=torch.long, device=dev),
        p,
        q,
        generators,
        torch.tensor(list(greedy), dtype=torch.bool, device=dev),
        onehot,
    )
    n_l, tok_l = n.tolist(), tokens.tolist()
    return [VerifyResult(n_l[i], tok_l[i][: n_l[i] + 1]) for i in range(b)]


def verify(
    draft_token_ids: Sequence[int],
    draft_probs: torch.Tensor | None,
    target_probs: torch.Tensor,
    generator: torch.Generator | None,
    greedy: bool,
) -> VerifyResult:
    """Verify one request: draft_probs [k, V] or None (greedy drafting), target_probs [k + 1, V].
    See the module docstring for the rule."""
    return verify_batch([draft_token_ids], [draft_probs], [target_probs], [generator], [greedy])[0]


def target_probs_for_drafts(logits: torch.Tensor, row: SamplingRow, draft_token_ids: Sequence[int]) -> torch.Tensor:
    """Processed target distributions p_1..p_{k+1} for one request.

    logits [k + 1, V]: the target model's logits at the k + 1 verified positions (row i predicts
    the token after d_1..d_i). Position i is processed as if d_1..d_i had been generated, so the
    penalties see them. `row` holds the request's params and history before this step.
    Returns [k + 1, V] float32.
    """
    k = len(draft_token_ids)
    if logits.dim() != 2 or logits.shape[0] != k + 1:
        raise ValueError(f"logits must be [{k + 1}, V], got {tuple(logits.shape)}")
    base = list(row.output_token_ids)
    rows = [replace(row, output_token_ids=base + list(draft_token_ids[:i])) for i in range(k + 1)]
    return processed_probs(logits, rows)
