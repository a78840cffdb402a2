"""Tests for splitserve.engine.speculative: losslessness of MTP draft verification.

Statistical tests use fixed seeds, so they are deterministic. Each compares empirical counts over
N independent verification steps (one generator per step) with the exact target distribution by a
chi-square goodness-of-fit test, failing below p-value 1e-3: for a correct verifier the p-value is
uniform, so a fixed seed lands below 1e-3 with probability 1e-3. With N = 20000 the test has power
against small errors: a total-variation error delta moves the chi-square noncentrality by at least
N * (2 * delta)**2, i.e. ~200 at delta = 0.05, far beyond the 1e-3 critical value (~24 for 7
degrees of freedom); `test_chi_square_detects_a_wrong_verifier` checks that on a real mistake.
Acceptance rates are compared with their exact value within 5 binomial standard errors.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from splitserve.engine.sampler import SamplingRow, make_generator, sample_from_probs, sample_tokens
from splitserve.engine.sampling_params import SamplingParams
from splitserve.engine.speculative import (
    VerifyResult,
    target_probs_for_drafts,
    verify,
    verify_batch,
    verify_padded,
)

N_TRIALS = 20_000
V = 8
P_MIN = 1e-3


def chi2_pvalue(tokens: np.ndarray, probs: np.ndarray) -> float:
    """Goodness-of-fit p-value of observed tokens (ints) against `probs` ([V], sums to 1).
    Tokens outside the support make the test fail outright (p-value 0)."""
    counts = np.bincount(tokens, minlength=len(probs)).astype(np.float64)
    support = probs > 0
    if counts[~support].sum() > 0:
        return 0.0
    expected = probs[support] / probs[support].sum() * counts.sum()
    return float(stats.chisquare(counts[support], expected).pvalue)


def dirichlet(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    x = rng.dirichlet(np.ones(V), size=shape)
    return x.astype(np.float32).astype(np.float64)  # as float32 sees it, renormalised below


def _norm32(x: np.ndarray) -> torch.Tensor:
    t = torch.tensor(x, dtype=torch.float32)
    return t / t.sum(-1, keepdim=True)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ----------------------------------------------------------------------------------------------
# Greedy.
# ----------------------------------------------------------------------------------------------


def test_greedy_verify_rule_random() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        k = int(rng.integers(0, 5))
        # integer-ish logits -> frequent ties; argmax must take the lowest id
        p = torch.softmax(torch.tensor(rng.integers(0, 3, size=(k + 1, V)), dtype=torch.float32), -1)
        am = [min(np.flatnonzero(row == row.max())) for row in p.numpy()]
        drafts = [am[i] if rng.random() < 0.7 else int(rng.integers(0, V)) for i in range(k)]
        res = verify(drafts, None, p, None, greedy=True)
        n = 0
        while n < k and drafts[n] == am[n]:
            n += 1
        assert res == VerifyResult(n, drafts[:n] + [int(am[n])])


class ToyModel:
    """Deterministic toy LM: logits depend on the whole prefix; coarse values -> many ties."""

    def __init__(self, vocab: int, salt: int, noise: float = 0.0) -> None:
        self.vocab, self.salt, self.noise = vocab, salt, noise

    def __call__(self, prefix: list[int]) -> torch.Tensor:
        g = torch.Generator().manual_seed(hash((self.salt, *prefix)) & 0xFFFFFFFF)
        logits = torch.randint(-4, 5, (self.vocab,), generator=g).float() / 2
        if self.noise:
            g2 = torch.Generator().manual_seed(hash((self.salt + 1, *prefix)) & 0xFFFFFFFF)
            logits = logits + self.noise * torch.randn(self.vocab, generator=g2)
        return logits


@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("seed", [0, 1])
def test_greedy_speculative_equals_greedy_decoding(k: int, seed: int) -> None:
    """End to end, with penalties: speculative decoding (noisy greedy draft, verification on the
    target's processed distributions) emits exactly plain greedy decoding's tokens."""
    vocab, length = 12, 40
    target = ToyModel(vocab, salt=seed)
    draft = ToyModel(vocab, salt=seed, noise=0.6)  # often right, sometimes wrong
    params = SamplingParams(temperature=0.0, repetition_penalty=1.3, presence_penalty=0.4, frequency_penalty=0.3)
    prompt = [1, 2, 3]

    plain: list[int] = []
    while len(plain) < length:
        row = SamplingRow(params, None, prompt, list(plain))
        plain.append(int(sample_tokens(target(prompt + plain)[None], [row])[0]))

    spec: list[int] = []
    accepted = 0
    while len(spec) < length:
        drafts: list[int] = []
        for _ in range(k):
            drafts.append(int(draft(prompt + spec + drafts).argmax()))
        logits = torch.stack([target(prompt + spec + drafts[:i]) for i in range(k + 1)])
        p = target_probs_for_drafts(logits, SamplingRow(params, None, prompt, list(spec)), drafts)
        res = verify(drafts, None, p, None, greedy=True)
        assert res.tokens[: res.num_accepted] == drafts[: res.num_accepted]
        accepted += res.num_accepted
        spec.extend(res.tokens)
    assert spec[:length] == plain
    assert accepted > 0  # the test exercised acceptance


# ----------------------------------------------------------------------------------------------
# Sampling: statistical losslessness.
# ----------------------------------------------------------------------------------------------


def _trial_batch(k: int, onehot: bool, seed: int, n: int = N_TRIALS):
    """n independent verification steps against fixed p_1..p_{k+1} and q_1..q_k."""
    rng = np.random.default_rng(seed)
    p = _norm32(dirichlet(rng, (k + 1,)))  # [k+1, V]
    if onehot:
        # greedy drafting: fixed draft tokens, not the target's argmax (so rejections happen)
        d = torch.tensor([int(np.argsort(p[i].numpy())[V // 2]) for i in range(k)], dtype=torch.long)
        drafts = d.expand(n, k)
        q = None
        q_full = torch.nn.functional.one_hot(d, V).float()
    else:
        q_full = _norm32(dirichlet(rng, (k,)))
        q = q_full.expand(n, k, V)
        drafts = torch.stack(
            [
                torch.tensor(rng.choice(V, size=n, p=q_full[i].double().numpy() / q_full[i].double().sum().item()))
                for i in range(k)
            ],
            1,
        )
    gens = [make_generator(seed * 1_000_003 + i) for i in range(n)]
    num, tokens = verify_padded(
        drafts, torch.full((n,), k), p.expand(n, k + 1, V), q, gens, torch.zeros(n, dtype=torch.bool)
    )
    return p, q_full, drafts, num, tokens


@pytest.mark.parametrize("onehot", [False, True], ids=["random_q", "onehot_q"])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_sampling_is_lossless(k: int, onehot: bool) -> None:
    p, q, drafts, num, tokens = _trial_batch(k, onehot, seed=10 * k + onehot)
    pn, qn = p.double().numpy(), q.double().numpy()
    # Structure: accepted drafts are emitted verbatim, then exactly one more token.
    n = num.numpy()
    assert ((tokens >= 0).sum(1).numpy() == n + 1).all()
    pos = torch.arange(k)[None]
    assert torch.equal(torch.where(pos < num[:, None], tokens[:, :k], -1), torch.where(pos < num[:, None], drafts, -1))
    # (1) the first emitted token is distributed as p_1
    assert chi2_pvalue(tokens[:, 0].numpy(), pn[0]) > P_MIN
    # (2) given that d_1 was accepted, the second emitted token is distributed as p_2
    sel = n >= 1
    assert chi2_pvalue(tokens[sel, 1].numpy(), pn[1]) > P_MIN
    # (3) acceptance: P(d_1 accepted) = sum_x min(p_1, q_1); P(n >= j) = prod_{i<=j} alpha_i
    alpha = np.minimum(pn[:k], qn).sum(1)
    for j in range(1, k + 1):
        expected = float(np.prod(alpha[:j]))
        rate = float((n >= j).mean())
        se = np.sqrt(expected * (1 - expected) / len(n))
        assert abs(rate - expected) <= 5 * se + 1e-9, (j, rate, expected)
    assert 0.02 < alpha[0] < 0.98  # the configuration exercises both branches


def test_chi_square_detects_a_wrong_verifier() -> None:
    """Negative control for the statistic above: 'accept every draft' (which emits q_1's
    distribution as first token) is rejected with the same N and threshold."""
    p, q, drafts, _, _ = _trial_batch(1, onehot=False, seed=11)
    assert chi2_pvalue(drafts[:, 0].numpy(), p[0].double().numpy()) < P_MIN


def _tables(rng: np.random.Generator, depth: int) -> dict[tuple[int, ...], np.ndarray]:
    """A conditional distribution for every prefix of length < depth (vocab 4)."""
    out: dict[tuple[int, ...], np.ndarray] = {}

    def rec(prefix: tuple[int, ...]) -> None:
        x = rng.dirichlet(np.ones(4) * 0.7).astype(np.float32)
        out[prefix] = (x / x.sum()).astype(np.float32)
        if len(prefix) + 1 < depth:
            for t in range(4):
                rec(prefix + (t,))

    rec(())
    return out


@pytest.mark.parametrize("onehot", [False, True], ids=["random_q", "onehot_q"])
@pytest.mark.parametrize("k", [1, 3])
def test_prefix_dependent_target_joint_of_two_tokens(k: int, onehot: bool) -> None:
    """Target and draft distributions depend on the prefix. Decoding by speculative steps until
    two tokens are out, the joint law of (x_1, x_2) equals p(x_1) p(x_2 | x_1)."""
    rng = np.random.default_rng(100 + k + 10 * onehot)
    n = 12_000
    p_tab = _tables(rng, k + 2)
    q_tab = _tables(rng, k + 2)
    if onehot:
        q_tab = {key: np.eye(4, dtype=np.float32)[int(np.argmax(v))] for key, v in q_tab.items()}
    gens = [make_generator(7_000_000 + 31 * k + 5 * onehot + i) for i in range(n)]
    out: list[list[int]] = [[] for _ in range(n)]
    for _ in range(2):  # at most two steps are needed
        idx = [i for i in range(n) if len(out[i]) < 2]
        if not idx:
            break
        drafts, ps, qs = [], [], []
        for i in idx:
            prefix = tuple(out[i])
            d: list[int] = []
            qi = []
            for _ in range(k):
                q = q_tab[prefix + tuple(d)]
                qi.append(q)
                d.append(int(rng.choice(4, p=q / q.sum())))
            drafts.append(d)
            ps.append(torch.tensor(np.stack([p_tab[prefix + tuple(d[:j])] for j in range(k + 1)])))
            qs.append(None if onehot else torch.tensor(np.stack(qi)))
        res = verify_batch(drafts, qs, ps, [gens[i] for i in idx], [False] * len(idx))
        for i, r in zip(idx, res):
            out[i].extend(r.tokens)
    pairs = np.array([o[0] * 4 + o[1] for o in out])
    joint = np.array([p_tab[()][a] * p_tab[(a,)][b] for a in range(4) for b in range(4)], dtype=np.float64)
    assert chi2_pvalue(pairs, joint / joint.sum()) > P_MIN


# ----------------------------------------------------------------------------------------------
# Mechanics: batching, k = 0, randomness consumption, validation.
# ----------------------------------------------------------------------------------------------


def test_batch_with_mixed_k_equals_single_verification() -> None:
    rng = np.random.default_rng(3)
    ks = [0, 3, 1, 2, 3, 0]
    greedy = [False, False, True, False, True, True]
    onehot = [False, True, False, False, True, False]
    drafts, qs, ps = [], [], []
    for k, oh in zip(ks, onehot):
        q = _norm32(dirichlet(rng, (k,)))
        drafts.append([int(rng.choice(V, p=q[i].double().numpy() / q[i].double().sum().item())) for i in range(k)])
        qs.append(None if oh else q)
        ps.append(_norm32(dirichlet(rng, (k + 1,))))
    batched = verify_batch(drafts, qs, ps, [make_generator(i) for i in range(len(ks))], greedy)
    singles = [verify(drafts[i], qs[i], ps[i], make_generator(i), greedy[i]) for i in range(len(ks))]
    assert batched == singles
    for r, d, k in zip(batched, drafts, ks):
        assert 0 <= r.num_accepted <= k and len(r.tokens) == r.num_accepted + 1
        assert r.tokens[: r.num_accepted] == d[: r.num_accepted]


def test_k0_is_plain_sampling_and_consumption_is_fixed() -> None:
    rng = np.random.default_rng(4)
    p = _norm32(dirichlet(rng, (4,)))
    for seed in range(20):
        g1, g2 = make_generator(seed), make_generator(seed)
        r = verify([], None, p[:1], g1, greedy=False)
        assert r == VerifyResult(0, [int(sample_from_probs(p[:1], [g2])[0])])
        assert torch.equal(g1.get_state(), g2.get_state())
    # k = 3: exactly 3 uniforms then V exponentials, whatever is accepted.
    for seed in range(20):
        g = make_generator(seed)
        verify([0, 1, 2], None, p, g, greedy=False)
        ref = make_generator(seed)
        torch.rand(3, generator=ref)
        torch.empty(V).exponential_(generator=ref)
        assert torch.equal(g.get_state(), ref.get_state())
    g = make_generator(0)
    before = g.get_state()
    verify([0, 1, 2], None, p, g, greedy=True)
    assert torch.equal(g.get_state(), before)


def test_seeded_verification_is_reproducible() -> None:
    rng = np.random.default_rng(5)
    p = _norm32(dirichlet(rng, (3,)))
    q = _norm32(dirichlet(rng, (2,)))
    runs = [[verify([1, 2], q, p, make_generator(s), False) for s in range(30)] for _ in range(2)]
    assert runs[0] == runs[1]


def test_target_probs_for_drafts_sees_accepted_drafts() -> None:
    logits = torch.zeros(3, 5)
    params = SamplingParams(temperature=1.0, presence_penalty=1.0)
    p = target_probs_for_drafts(logits, SamplingRow(params, make_generator(0), [], [4]), [1, 2])
    # position i is penalised for output [4] + drafts[:i]
    for i, seen in enumerate([{4}, {4, 1}, {4, 1, 2}]):
        w = np.array([np.exp(-1.0) if t in seen else 1.0 for t in range(5)])
        np.testing.assert_allclose(p[i].numpy(), w / w.sum(), rtol=1e-6)


def test_validation() -> None:
    p = torch.full((2, V), 1 / V)
    with pytest.raises(ValueError):
        verify([1], None, p[:1], make_generator(0), False)  # wrong target length
    with pytest.raises(ValueError):
        verify([1], None, p, None, False)  # sampling without a generator
    with pytest.raises(ValueError):
        verify([1], torch.ones(2, V) / V, p, make_generator(0), False)  # q shape
    with pytest.raises(ValueError):
        verify([V], None, p, make_generator(0), False)  # draft id out of range
    # padding beyond k_b is ignored, whatever it holds
    n, toks = verify_padded(
        torch.tensor([[-1, 99]]),
        torch.tensor([0]),
        p[:1].expand(1, 3, V).contiguous(),
        None,
        [None],
        torch.tensor([True]),
    )
    assert n.tolist() == [0] and toks.tolist() == [[0, -1, -1]]
