"""Tests for splitserve.engine.sampler.

Expected values come from the definitions (hand computations, or an independent float64
reference written here in plain Python/numpy), never from the code under test.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from scipy import stats

from splitserve.engine.sampler import (
    Sampler,
    SamplingRow,
    apply_logit_bias,
    apply_min_p,
    apply_presence_frequency_penalties,
    apply_repetition_penalty,
    apply_temperature,
    apply_top_k,
    apply_top_k_top_p,
    apply_top_p,
    biased_logits,
    make_generator,
    process_logits,
    processed_probs,
    prompt_logprobs,
    sample_tokens,
    token_counts,
)
from splitserve.engine.sampling_params import SamplingParams

INF = float("inf")


def kept(x: torch.Tensor) -> list[int]:
    """Ids of the finite entries of a 1-D tensor."""
    return [i for i, v in enumerate(x.tolist()) if v != -INF]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ----------------------------------------------------------------------------------------------
# Independent reference of the whole pipeline, one row, float64, plain Python.
# ----------------------------------------------------------------------------------------------


def ref_penalised(
    logits: Sequence[float], p: SamplingParams, prompt: Sequence[int], output: Sequence[int]
) -> list[float]:
    lg = [float(x) for x in logits]
    for t, b in p.logit_bias:
        lg[t] += b
    for t in set(prompt) | set(output):
        lg[t] = lg[t] * p.repetition_penalty if lg[t] < 0 else lg[t] / p.repetition_penalty
    for t, c in Counter(output).items():
        lg[t] -= p.presence_penalty + p.frequency_penalty * c
    return lg


def ref_probs(
    logits: Sequence[float], p: SamplingParams, prompt: Sequence[int] = (), output: Sequence[int] = ()
) -> tuple[np.ndarray, float]:
    """(processed distribution, distance of the nearest top-p / min-p decision boundary)."""
    lg = ref_penalised(logits, p, prompt, output)
    v = len(lg)
    if p.greedy:
        best = max(range(v), key=lambda t: (lg[t], -t))
        out = np.zeros(v)
        out[best] = 1.0
        return out, INF
    lg = [x / p.temperature for x in lg]
    order = sorted(range(v), key=lambda t: (-lg[t], t))
    keep = order[: p.top_k] if p.top_k > 0 else order
    m = max(lg[t] for t in keep)
    w = {t: math.exp(lg[t] - m) for t in keep}
    z = sum(w.values())
    margin = INF
    if p.top_p < 1.0:
        cum, prefix = 0.0, []
        for t in keep:
            prefix.append(t)
            cum += w[t] / z
            margin = min(margin, abs(cum - p.top_p))
            if cum >= p.top_p:
                break
        keep = prefix
    if p.min_p > 0.0:
        z2 = sum(w[t] for t in keep)
        pmax = max(w[t] for t in keep) / z2
        for t in keep:
            margin = min(margin, abs(w[t] / z2 - p.min_p * pmax))
        keep = [t for t in keep if w[t] / z2 >= p.min_p * pmax]
    out = np.zeros(v)
    for t in keep:
        out[t] = w[t]
    return out / out.sum(), margin


# ----------------------------------------------------------------------------------------------
# Penalties: hand-computed expected logits.
# ----------------------------------------------------------------------------------------------


def test_repetition_penalty_hand_computed() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, -3.0, 0.0, 4.0]])
    seen = torch.tensor([[True, True, False, True, True, False]])
    out = apply_repetition_penalty(logits, seen, [2.0])
    # positive / 2, negative * 2, zero stays zero, unseen untouched.
    assert out.tolist() == [[1.0, -2.0, 0.5, -6.0, 0.0, 4.0]]
    assert logits.tolist() == [[2.0, -1.0, 0.5, -3.0, 0.0, 4.0]]  # input untouched


def test_presence_frequency_hand_computed() -> None:
    logits = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    counts = token_counts([[0, 0, 0, 2], [3]], 4)
    assert counts.tolist() == [[3, 0, 1, 0], [0, 0, 0, 1]]
    out = apply_presence_frequency_penalties(logits, counts, [0.5, 1.0], [0.25, -0.5])
    # row 0: t0: 1 - 0.5 - 0.25*3 = -0.25 ; t2: 1 - 0.5 - 0.25 = 0.25
    # row 1: t3: 0 - 1.0 + 0.5*1 = -0.5
    assert out.tolist() == [[-0.25, 1.0, 0.25, 1.0], [0.0, 0.0, 0.0, -0.5]]


def test_pipeline_penalty_order_and_scope_hand_computed() -> None:
    """Repetition first over prompt+output, then presence/frequency over output only."""
    logits = torch.tensor([[3.0, -2.0, 1.0, 5.0, 0.5]])
    params = SamplingParams(temperature=0.0, repetition_penalty=2.0, presence_penalty=1.0, frequency_penalty=0.5)
    row = SamplingRow(params, None, prompt_token_ids=[0, 1], output_token_ids=[1, 2, 2])
    out = process_logits(logits, [row])
    # t0: prompt only -> 3/2 = 1.5 ; t1: -2*2 = -4, output count 1 -> -4 - 1 - 0.5 = -5.5
    # t2: 1/2 = 0.5, count 2 -> 0.5 - 1 - 1 = -1.5 ; t3, t4 untouched.
    assert out.tolist() == [[1.5, -5.5, -1.5, 5.0, 0.5]]
    # Greedy keeps penalties: the argmax is still t3; with t3 penalised it moves.
    row2 = SamplingRow(params, None, prompt_token_ids=[3], output_token_ids=[3])
    # t3: 5/2 = 2.5 - 1 - 0.5 = 1.0 < t0 = 3.0
    assert sample_tokens(logits, [row2]).tolist() == [0]


# ----------------------------------------------------------------------------------------------
# Temperature, top-k, top-p, min-p against direct references.
# ----------------------------------------------------------------------------------------------


def test_temperature() -> None:
    logits = torch.tensor([[1.0, -2.0, 4.0], [1.0, -2.0, 4.0]])
    out = apply_temperature(logits, [0.5, 0.0])
    assert out.tolist() == [[2.0, -4.0, 8.0], [1.0, -2.0, 4.0]]


def test_top_k_ties_keep_lowest_ids() -> None:
    logits = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0, 3.0]])
    assert kept(apply_top_k(logits, [2])[0]) == [1, 2]
    assert kept(apply_top_k(logits, [5])[0]) == [1, 2, 3, 4, 5]
    assert kept(apply_top_k(logits, [0])[0]) == list(range(6))
    assert kept(apply_top_k(logits, [100])[0]) == list(range(6))


def test_top_p_ties_and_boundary() -> None:
    logits = torch.zeros(1, 4)  # uniform 0.25 each: exact in float32
    # The minimal prefix reaching 0.5 is exactly 2 tokens (lowest ids first); 0.5000001 needs 3.
    assert kept(apply_top_p(logits, [0.5])[0]) == [0, 1]
    assert kept(apply_top_p(logits, [0.51])[0]) == [0, 1, 2]
    assert kept(apply_top_p(logits, [0.25])[0]) == [0]
    assert kept(apply_top_p(logits, [0.01])[0]) == [0]
    assert kept(apply_top_p(logits, [1.0])[0]) == [0, 1, 2, 3]
    # Kept logits are unchanged.
    x = torch.tensor([[0.0, math.log(2.0), math.log(5.0), math.log(2.0)]])  # probs .1 .2 .5 .2
    out = apply_top_p(x, [0.65])
    assert kept(out[0]) == [1, 2]  # .5, then .2 (id 1 before id 3) reaches .7 >= .65
    assert out[0, 1].item() == x[0, 1].item() and out[0, 2].item() == x[0, 2].item()


logit_rows = st.lists(st.integers(-8, 8).map(lambda i: i / 4.0), min_size=2, max_size=12)


@settings(max_examples=60, deadline=None)
@given(logit_rows, st.integers(0, 14), st.floats(0.05, 1.0))
def test_top_k_top_p_against_reference(row: list[float], k: int, p: float) -> None:
    v = len(row)
    order = sorted(range(v), key=lambda t: (-row[t], t))
    keep = order[:k] if 0 < k else order
    w = np.array([math.exp(row[t]) for t in keep])
    cum = np.cumsum(w / w.sum())
    assume(np.all(np.abs(cum - p) > 1e-5) or p == 1.0)
    n = int(np.argmax(cum >= p)) + 1 if p < 1.0 else len(keep)
    expected = sorted(keep[:n])
    out = apply_top_k_top_p(torch.tensor([row]), [k], [p])
    assert kept(out[0]) == expected
    # survivors keep their value
    for t in expected:
        assert out[0, t].item() == row[t]


@settings(max_examples=60, deadline=None)
@given(logit_rows, st.floats(0.0, 1.0))
def test_min_p_against_reference(row: list[float], mp: float) -> None:
    e = np.exp(np.array(row, dtype=np.float64))
    probs = e / e.sum()
    assume(np.all(np.abs(probs - mp * probs.max()) > 1e-5))
    expected = [t for t in range(len(row)) if probs[t] >= mp * probs.max()]
    assert kept(apply_min_p(torch.tensor([row]), [mp])[0]) == expected


def test_min_p_boundary_keeps_ties_with_max() -> None:
    # probability == min_p * max is kept: min_p = 1 keeps exactly the tied maxima
    assert kept(apply_min_p(torch.tensor([[0.0, 1.0, 1.0, -2.0]]), [1.0])[0]) == [1, 2]
    assert kept(apply_min_p(torch.tensor([[0.0, 1.0, 1.0, -2.0]]), [0.0])[0]) == [0, 1, 2, 3]


params_st = st.builds(
    SamplingParams,
    temperature=st.sampled_from([0.0, 0.5, 1.0, 2.0]),
    top_p=st.sampled_from([1.0, 0.9, 0.6, 0.3]),
    top_k=st.sampled_from([0, 1, 3, 6]),
    min_p=st.sampled_from([0.0, 0.05, 0.3]),
    presence_penalty=st.sampled_from([0.0, 0.5, -0.25]),
    frequency_penalty=st.sampled_from([0.0, 0.25, 1.0]),
    repetition_penalty=st.sampled_from([1.0, 1.5, 2.0, 0.5]),
    seed=st.integers(0, 2**40),
    logprobs=st.sampled_from([None, 0, 2, 5]),
    logit_bias=st.sampled_from([(), (), ((3, 100.0),), ((0, -100.0), (5, 2.5)), ((9, -1.25), (2, 0.75))]),
)


@settings(max_examples=80, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.lists(st.integers(-8, 8).map(lambda i: i / 4.0), min_size=10, max_size=10),
            params_st,
            st.lists(st.integers(0, 9), max_size=4),
            st.lists(st.integers(0, 9), max_size=5),
        ),
        min_size=1,
        max_size=4,
    )
)
def test_full_pipeline_against_reference(cases: list) -> None:
    """processed_probs of a batch equals the float64 reference of each row (all transforms, in
    the specified order)."""
    logits = torch.tensor([c[0] for c in cases])
    rows = [SamplingRow(c[1], make_generator(c[1].seed), c[2], c[3]) for c in cases]
    got = processed_probs(logits, rows)
    for i, (lg, p, prompt, output) in enumerate(cases):
        exp, margin = ref_probs(lg, p, prompt, output)
        assume(margin > 1e-5)
        np.testing.assert_allclose(got[i].numpy(), exp, atol=2e-6)
        # the support: filtered tokens are exactly 0, kept ones positive (except where float32 underflows:
        # a +100 bias at temperature 0.5 leaves the others at exp(-200), 0 in float32 but not in float64)
        decided = (exp == 0) | (exp > 1e-30)
        assert ((got[i].numpy() > 0) == (exp > 0))[decided].all()
    assert torch.allclose(got.sum(-1), torch.ones(len(cases)), atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Greedy.
# ----------------------------------------------------------------------------------------------


def test_greedy_is_argmax_lowest_tie() -> None:
    torch.manual_seed(0)
    logits = torch.randn(16, 50)
    logits[3, 7] = logits[3, 20] = 100.0  # tie: id 7 wins
    rows = [SamplingRow(SamplingParams(temperature=0.0, top_k=3, top_p=0.2, min_p=0.5)) for _ in range(16)]
    toks = sample_tokens(logits, rows)
    assert toks.tolist() == logits.argmax(-1).tolist()
    assert toks[3].item() == 7
    probs = processed_probs(logits, rows)
    assert torch.equal(probs, torch.nn.functional.one_hot(toks, 50).float())


# ----------------------------------------------------------------------------------------------
# Seeds, batch invariance, generator consumption.
# ----------------------------------------------------------------------------------------------

V_INV = 32


def _logits_for(key: int, step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(key * 1000 + step)
    return torch.randn(V_INV, generator=g) * 2.0


def _run(
    batch: list[tuple[int, SamplingParams]], steps: int
) -> tuple[dict[int, list[int]], dict[int, list[torch.Tensor]]]:
    """Decode `steps` tokens for every (key, params) in the batch, in that order."""
    gens = {key: make_generator(p.seed) for key, p in batch}
    outs: dict[int, list[int]] = {key: [] for key, _ in batch}
    probs_log: dict[int, list[torch.Tensor]] = {key: [] for key, _ in batch}
    sampler = Sampler()
    for s in range(steps):
        logits = torch.stack([_logits_for(key, s) for key, _ in batch])
        rows = [SamplingRow(p, gens[key], [key % V_INV, 3], list(outs[key])) for key, p in batch]
        probs = sampler.processed_probs(logits, rows)
        res = sampler.sample(logits, rows)
        for (key, _), r, pr in zip(batch, res, probs):
            outs[key].append(r.token_id)
            probs_log[key].append(pr)
    return outs, probs_log


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(params_st, st.lists(params_st, max_size=5), st.randoms(use_true_random=False))
def test_seeded_samples_are_batch_invariant(target: SamplingParams, others: list[SamplingParams], rnd) -> None:
    steps = 3
    solo, solo_probs = _run([(0, target)], steps)
    batch = [(0, target)] + [(i + 1, p) for i, p in enumerate(others)]
    rnd.shuffle(batch)
    mixed, mixed_probs = _run(batch, steps)
    assert mixed[0] == solo[0]
    for a, b in zip(solo_probs[0], mixed_probs[0]):
        assert torch.equal(a, b)  # bitwise: the row's computation ignores its neighbours
    # another composition / order, same answer
    batch2 = list(reversed(batch)) + [(99, SamplingParams(temperature=0.7, seed=5))]
    assert _run(batch2, steps)[0][0] == solo[0]


def test_seed_reproducible_and_seed_sensitive() -> None:
    p = SamplingParams(temperature=1.0, seed=1234)
    a, _ = _run([(0, p)], 20)
    b, _ = _run([(0, p)], 20)
    c, _ = _run([(0, SamplingParams(temperature=1.0, seed=4321))], 20)
    assert a == b
    assert a != c


def test_fixed_generator_consumption_per_step() -> None:
    """Each sampled token consumes exactly V exponentials, whatever the params; greedy none."""
    v = 40
    logits = torch.randn(3, v)
    variants = [
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.3, top_k=2),
        SamplingParams(temperature=1.5, top_p=0.1, min_p=0.2, repetition_penalty=1.3),
    ]
    ref = torch.Generator().manual_seed(77)
    for _ in range(2):
        torch.empty(v).exponential_(generator=ref)
    for params in variants:
        g = torch.Generator().manual_seed(77)
        for _ in range(2):
            rows = [SamplingRow(params, g, [1], [2])] + [
                SamplingRow(variants[0], torch.Generator().manual_seed(i)) for i in range(2)
            ]
            sample_tokens(logits, rows)
        assert torch.equal(g.get_state(), ref.get_state())
    g = torch.Generator().manual_seed(77)
    before = g.get_state()
    sample_tokens(logits[:1], [SamplingRow(SamplingParams(temperature=0.0), g)])
    assert torch.equal(g.get_state(), before)


def test_sampled_distribution_matches_processed_probs() -> None:
    """Chi-square goodness of fit of 6000 independent draws (one generator per draw) against
    processed_probs; fixed seeds, so deterministic. p-value threshold 1e-3."""
    v, n = 6, 6000
    logits = torch.tensor([[0.3, 1.2, -0.5, 2.0, 0.0, 1.0]]).expand(n, v)
    params = SamplingParams(temperature=0.8, top_k=5, min_p=0.05)
    rows = [SamplingRow(params, make_generator(10_000 + i)) for i in range(n)]
    probs = processed_probs(logits[:1], rows[:1])[0].double().numpy()
    toks = sample_tokens(logits, rows).numpy()
    counts = np.bincount(toks, minlength=v)
    support = probs > 0
    assert counts[~support].sum() == 0
    pval = stats.chisquare(counts[support], probs[support] / probs[support].sum() * n).pvalue
    assert pval > 1e-3


def test_sampling_row_needs_generator() -> None:
    with pytest.raises(ValueError):
        sample_tokens(torch.zeros(1, 4), [SamplingRow(SamplingParams(temperature=1.0), None)])


def test_make_generator_random_seed_when_none() -> None:
    a, b = make_generator(None), make_generator(None)
    assert a.initial_seed() != b.initial_seed()
    assert make_generator(-1).initial_seed() == 2**64 - 1


# ----------------------------------------------------------------------------------------------
# Logprobs.
# ----------------------------------------------------------------------------------------------


def test_logprobs_are_raw_and_normalised() -> None:
    torch.manual_seed(1)
    v = 12
    logits = torch.randn(4, v) * 3
    params = [
        SamplingParams(temperature=0.3, top_k=2, repetition_penalty=2.0, logprobs=v, seed=1),
        SamplingParams(temperature=0.0, logprobs=3),
        SamplingParams(temperature=1.0, logprobs=None, seed=2),
        SamplingParams(temperature=1.7, logprobs=0, seed=3, presence_penalty=2.0),
    ]
    rows = [SamplingRow(p, make_generator(p.seed), [0, 1], [2]) for p in params]
    out = Sampler().sample(logits, rows)
    ref = torch.log_softmax(logits.double(), -1)
    for i, o in enumerate(out):
        if params[i].logprobs is None:
            assert o.logprobs is None
            continue
        lp = o.logprobs
        assert lp is not None and lp.token_id == o.token_id
        assert lp.logprob == pytest.approx(ref[i, o.token_id].item(), abs=1e-5)
        assert lp.logprob <= 0.0
        assert len(lp.top) == params[i].logprobs
        vals = [x for _, x in lp.top]
        assert vals == sorted(vals, reverse=True)
        for t, x in lp.top:
            assert x == pytest.approx(ref[i, t].item(), abs=1e-5)
    full = out[0].logprobs
    assert full is not None
    assert sorted(t for t, _ in full.top) == list(range(v))
    assert sum(math.exp(x) for _, x in full.top) == pytest.approx(1.0, abs=1e-5)
    # greedy row: chosen token is the top alternative
    assert out[1].logprobs is not None and out[1].logprobs.top[0][0] == out[1].token_id
    assert out[3].logprobs is not None and out[3].logprobs.top == []


def test_prompt_logprobs_against_reference() -> None:
    torch.manual_seed(2)
    prompt = [5, 1, 1, 7, 0, 3]
    s, v = len(prompt), 9
    logits = torch.randn(s, v)
    out = prompt_logprobs(logits, prompt, 3)
    assert len(out) == s and out[0] is None
    ref = torch.log_softmax(logits.double(), -1)
    for j in range(1, s):
        e = out[j]
        assert e is not None and e.token_id == prompt[j]
        assert e.logprob == pytest.approx(ref[j - 1, prompt[j]].item(), abs=1e-6)
        top_ref = sorted(range(v), key=lambda t: -ref[j - 1, t].item())[:3]
        assert [t for t, _ in e.top] == top_ref
    # S = len(prompt) - 1 is enough; same result
    assert Sampler.prompt_logprobs(logits[: s - 1], prompt, 3) == out
    assert prompt_logprobs(logits, [4], 2) == [None]
    with pytest.raises(ValueError):
        prompt_logprobs(logits[:2], prompt, 1)


# ----------------------------------------------------------------------------------------------
# logit_bias.
# ----------------------------------------------------------------------------------------------


def test_logit_bias_params_are_canonical_and_validated() -> None:
    p = SamplingParams(logit_bias={7: 1, 2: -100})
    assert p.logit_bias == ((2, -100.0), (7, 1.0)) and p.has_logit_bias
    assert p == SamplingParams(logit_bias=[(7, 1.0), (2, -100.0)]) and hash(p) == hash(
        SamplingParams(logit_bias={2: -100, 7: 1})
    )
    assert not SamplingParams().has_logit_bias and not SamplingParams(logit_bias={}).has_logit_bias
    for bad, match in [
        ({-1: 1.0}, "token ids"),
        ({True: 1.0}, "token ids"),
        ({"3": 1.0}, "token ids"),
        ({3: 100.5}, r"\[-100, 100\]"),
        ({3: -101}, r"\[-100, 100\]"),
        ({3: math.nan}, r"\[-100, 100\]"),
        ({3: "1"}, "numbers"),
        ([(3, 1.0), (3, 2.0)], "twice"),
        ([(3,)], "pairs"),
    ]:
        with pytest.raises(ValueError, match=match):
            SamplingParams(logit_bias=bad)


def test_apply_logit_bias_adds_per_row_and_checks_ids() -> None:
    logits = torch.tensor([[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]])
    out = apply_logit_bias(logits, [((0, 1.5), (2, -100.0)), ()])
    assert out.tolist() == [[1.5, 1.0, -98.0], [3.0, 4.0, 5.0]]
    assert logits.tolist() == [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]  # input untouched
    with pytest.raises(ValueError, match="lie in"):
        apply_logit_bias(logits, [((3, 1.0),), ()])


def test_no_bias_pays_nothing() -> None:
    """Without a bias, biased_logits is the input itself (no copy, no cast)."""
    logits = torch.randn(3, 8, dtype=torch.bfloat16)
    assert biased_logits(logits, [SamplingParams()] * 3) is logits
    out = biased_logits(logits, [SamplingParams(), SamplingParams(logit_bias={1: 2.0}), SamplingParams()])
    assert out.dtype == torch.float32
    ref = logits.float().clone()
    ref[1, 1] += 2.0
    assert torch.equal(out, ref)


def test_bias_plus_100_forces_the_token_under_greedy() -> None:
    """OpenAI: +100 means exclusive selection (model logits here span ~ +-12, so +100 dominates)."""
    torch.manual_seed(3)
    v = 50
    logits = torch.randn(v, v) * 3  # row t is biased towards t
    rows = [SamplingRow(SamplingParams(temperature=0.0, logit_bias={t: 100.0})) for t in range(v)]
    assert sample_tokens(logits, rows).tolist() == list(range(v))
    # and under sampling: every draw is the forced token (the rest has mass < e^-70)
    rows = [SamplingRow(SamplingParams(temperature=1.0, logit_bias={t: 100.0}), make_generator(t)) for t in range(v)]
    assert sample_tokens(logits, rows).tolist() == list(range(v))


def test_bias_minus_100_bans_the_token() -> None:
    torch.manual_seed(4)
    v, n = 20, 400
    logits = torch.randn(1, v) * 3
    best, second = torch.topk(logits[0], 2).indices.tolist()
    greedy = SamplingRow(SamplingParams(temperature=0.0, logit_bias={best: -100.0}))
    assert sample_tokens(logits, [greedy]).tolist() == [second]
    # sampling at a high temperature (the banned token is the likeliest): never drawn in n draws,
    # while without the ban it is drawn often
    banned = [
        SamplingRow(SamplingParams(temperature=2.0, logit_bias={best: -100.0}), make_generator(i)) for i in range(n)
    ]
    free = [SamplingRow(SamplingParams(temperature=2.0), make_generator(i)) for i in range(n)]
    assert best not in sample_tokens(logits.expand(n, v), banned).tolist()
    assert sample_tokens(logits.expand(n, v), free).tolist().count(best) > n // 20


def test_biased_sampling_matches_the_biased_distribution() -> None:
    """Chi-square of 6000 draws against softmax((logits + bias) / T) computed here in float64."""
    v, n = 6, 6000
    raw = [0.3, 1.2, -0.5, 2.0, 0.0, 1.0]
    bias = {0: 1.5, 3: -2.0, 5: 0.25}
    params = SamplingParams(temperature=0.8, logit_bias=bias)
    x = np.array([raw[t] + bias.get(t, 0.0) for t in range(v)]) / 0.8
    exp = np.exp(x - x.max())
    exp /= exp.sum()
    rows = [SamplingRow(params, make_generator(20_000 + i)) for i in range(n)]
    counts = np.bincount(sample_tokens(torch.tensor([raw]).expand(n, v), rows).numpy(), minlength=v)
    assert stats.chisquare(counts, exp * n).pvalue > 1e-3


def test_mixed_batch_with_and_without_bias_equals_each_alone() -> None:
    torch.manual_seed(5)
    v = 30
    logits = torch.randn(6, v) * 2
    params = [
        SamplingParams(temperature=0.0, logit_bias={4: 100.0}),
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.9, seed=1, logit_bias={int(logits[2].argmax()): -100.0, 7: 3.0}),
        SamplingParams(temperature=0.9, seed=1),
        SamplingParams(temperature=0.7, top_k=4, seed=2, logit_bias={0: 5.0}, repetition_penalty=1.5, logprobs=3),
        SamplingParams(temperature=0.0, presence_penalty=1.0, logprobs=2),
    ]

    def rows() -> list[SamplingRow]:
        return [SamplingRow(p, make_generator(p.seed) if not p.greedy else None, [1, 2], [3, 4]) for p in params]

    batch = Sampler().sample(logits, rows())
    alone = [Sampler().sample(logits[i : i + 1], [r])[0] for i, r in enumerate(rows())]
    assert batch == alone
    probs_b = processed_probs(logits, rows())
    for i, r in enumerate(rows()):
        assert torch.equal(probs_b[i], processed_probs(logits[i : i + 1], [r])[0])
    assert batch[0].token_id == 4


def test_logprobs_are_after_the_bias() -> None:
    """Reported logprobs are log_softmax(logits + bias) (OpenAI), before penalties and temperature."""
    torch.manual_seed(6)
    v = 12
    logits = torch.randn(2, v) * 3
    bias = {2: 100.0, 5: -3.0}
    params = [
        SamplingParams(temperature=0.5, seed=9, logprobs=v, logit_bias=bias, presence_penalty=1.0),
        SamplingParams(temperature=0.0, logprobs=2),
    ]
    out = Sampler().sample(logits, [SamplingRow(p, make_generator(p.seed), [0], [1]) for p in params])
    ref0 = torch.log_softmax(
        logits[0].double() + torch.tensor([bias.get(t, 0.0) for t in range(v)], dtype=torch.float64), -1
    )
    ref1 = torch.log_softmax(logits[1].double(), -1)
    lp0, lp1 = out[0].logprobs, out[1].logprobs
    assert lp0 is not None and lp1 is not None
    assert out[0].token_id == 2 and lp0.logprob == pytest.approx(ref0[2].item(), abs=1e-5)
    for t, x in lp0.top:
        assert x == pytest.approx(ref0[t].item(), abs=1e-5)
    assert lp0.top[0][0] == 2
    assert lp1.logprob == pytest.approx(ref1[out[1].token_id].item(), abs=1e-5)
