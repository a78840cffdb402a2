"""Overlapped decode steps (engine/overlap.py) against the synchronous engine: the same streamed tokens,
logprobs and finish reasons for mixed workloads (arrivals while others decode, different lengths,
greedy and seeded sampling, stop tokens, EOS, max_tokens, aborts mid-stream, preemption), with no
block freed while a launched step still writes it, and every block free at the end."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch

from splitserve.engine.config import EngineConfig
from splitserve.engine.engine import Engine
from splitserve.engine.sampling_params import SamplingParams

from .conftest import random_prompts

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_engine(net, overlap: bool, **kw) -> Engine:
    base = dict(
        num_blocks=96,
        block_size=8,
        chunk_size=16,
        max_batch_tokens=64,
        paged_kernels=True,
        overlap_scheduling=overlap,
    )
    base.update(kw)
    return Engine(net, EngineConfig(**base))


@dataclass
class Stream:
    tokens: list[int] = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    reason: str | None = None
    finished: bool = False
    drafts: tuple[int, int] = (0, 0)  # MTP drafts proposed and accepted, as the finishing output reports


@dataclass
class Run:
    streams: dict[str, Stream]
    overlapped_steps: int = 0
    deferred_frees: int = 0  # step calls after which a finished request's blocks waited for a step in flight


def check_in_flight(eng: Engine) -> int:
    """Every block the step in flight writes is allocated, to its request or to the step's deferred
    frees, unless the host has waited for that step (an abort does); returns how many blocks wait in
    deferred frees."""
    f = eng.overlap.inflight if eng.overlap is not None else None
    if f is None:
        return 0
    for r, blocks in zip(f.reqs, f.writes):
        assert blocks
        for b in blocks:
            held = eng.blocks.ref[b] > 0 and (b in r.block_table or b in f.deferred)
            assert held or f.waited, f"block {b} of {r.request_id} freed while a launched step writes it"
    return len(f.deferred)


def drive(eng: Engine, arrivals: list[tuple[int, str, list[int], SamplingParams]], abort_after=None) -> Run:
    """Add each request at its step() call index, step until idle, collect what streams out; a request
    in abort_after is aborted as soon as it has streamed that many tokens (0: right after it is added),
    as the router does on a stop string or a client gone."""
    abort_after = abort_after or {}
    run = Run({})
    pending = sorted(arrivals, key=lambda a: a[0])
    call = 0
    while pending or eng.has_work:
        while pending and pending[0][0] <= call:
            _, rid, prompt, params = pending.pop(0)
            run.streams[rid] = Stream()
            if callable(prompt):  # a request prefilled elsewhere: adopt it (it returns the first token)
                run.streams[rid].tokens.append(prompt(eng))
            else:
                eng.add_request(rid, prompt, params)
            if abort_after.get(rid) == 0:
                assert eng.abort(rid)
                run.streams[rid].finished, run.streams[rid].reason = True, "abort"
        for out in eng.step():
            s = run.streams[out.request_id]
            if s.reason == "abort":
                continue  # the consumer is gone; anything still reported for it is dropped
            assert not s.finished, f"{out.request_id} reported after it finished"
            s.tokens += out.new_token_ids
            s.logprobs += out.new_logprobs or []
            if out.finished:
                s.finished, s.reason = True, out.finish_reason
                s.drafts = (out.draft_tokens, out.accepted_draft_tokens)
            elif out.request_id in abort_after and len(s.tokens) >= abort_after[out.request_id]:
                assert eng.abort(out.request_id)
                s.finished, s.reason = True, "abort"
                check_in_flight(eng)
        run.deferred_frees += check_in_flight(eng) > 0
        call += 1
        assert call < 1000, "the engine does not finish"
    assert all(s.finished for s in run.streams.values())
    assert eng.blocks_used == 0 and not eng.requests
    if eng.overlap is not None:
        assert eng.overlap.inflight is None
        run.overlapped_steps = eng.overlap.steps
    return run


def assert_same(a: Run, b: Run, drafts: bool = True) -> None:
    """The same streams; drafts: and the same MTP draft counts (the same step boundaries: not after a
    preemption one of them had alone, whose recompute starts the drafts afresh)."""
    assert a.streams.keys() == b.streams.keys()
    for rid, x in a.streams.items():
        y = b.streams[rid]
        assert x.tokens == y.tokens, rid
        assert x.reason == y.reason, rid
        assert x.drafts == y.drafts or not drafts, rid
        assert len(x.logprobs) == len(y.logprobs), rid
        for u, v in zip(x.logprobs, y.logprobs):
            assert u.token_id == v.token_id
            assert u.logprob == pytest.approx(v.logprob, abs=1e-5)
            assert [t for t, _ in u.top] == [t for t, _ in v.top]
            assert [p for _, p in u.top] == pytest.approx([p for _, p in v.top], abs=1e-5)


def both(net, arrivals, abort_after=None, **kw) -> tuple[Run, Run]:
    sync = drive(make_engine(net, False, **kw), arrivals, abort_after)
    over = drive(make_engine(net, True, **kw), arrivals, abort_after)
    assert sync.overlapped_steps == 0
    assert_same(sync, over)
    return sync, over


def mixed_workload(net, stop_token: int | None = None) -> list[tuple[int, str, list[int], SamplingParams]]:
    vocab, eos = net.cfg.vocab_size, net.cfg.eos_token_id
    prompts = random_prompts([5, 23, 40, 9, 31, 14, 3, 18], vocab, seed=7)
    params = [
        SamplingParams(temperature=0.0, max_tokens=14, ignore_eos=True, logprobs=2),
        SamplingParams(temperature=0.8, top_p=0.9, max_tokens=17, seed=3, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=30, logit_bias={eos: 5.5}),  # stops on EOS after a while
        SamplingParams(temperature=1.0, top_k=20, max_tokens=21, seed=5, logprobs=1, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=25, ignore_eos=True, stop_token_ids=(stop_token or 0,)),
        SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True),  # finished by its prefill's token
        SamplingParams(temperature=0.7, min_p=0.05, max_tokens=11, seed=11, ignore_eos=True, logit_bias={7: 2.0}),
        SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=0),
    ]
    calls = [0, 0, 2, 5, 9, 9, 14, 20]  # later requests arrive while the first ones decode
    return [(c, f"r{i}", p, sp) for i, (c, p, sp) in enumerate(zip(calls, prompts, params))]


def test_overlapped_engine_streams_what_the_synchronous_one_does(tiny_net) -> None:
    # a stop token that request r4 does generate (its 6th token without a stop)
    free = drive(make_engine(tiny_net, False), mixed_workload(tiny_net)).streams["r4"].tokens
    work = mixed_workload(tiny_net, stop_token=free[5])
    sync, over = both(tiny_net, work)
    assert sync.streams["r4"].reason == "stop" and len(sync.streams["r4"].tokens) <= 6
    assert sync.streams["r2"].reason == "stop" and sync.streams["r2"].tokens[-1] == tiny_net.cfg.eos_token_id
    assert {s.reason for s in sync.streams.values()} == {"stop", "length"}
    assert over.overlapped_steps > 10
    assert over.deferred_frees > 0  # a stop token finished a request whose next row was in flight


def test_a_full_batch_keeps_overlapping_while_requests_wait(tiny_net) -> None:
    """max_running 3 of 8 requests: the rest wait until a slot frees (then a synchronous step admits)."""
    sync, over = both(tiny_net, mixed_workload(tiny_net), max_running=3)
    assert over.overlapped_steps > 10


def test_aborts_mid_stream(tiny_net) -> None:
    work = mixed_workload(tiny_net)
    abort_after = {"r0": 3, "r1": 1, "r3": 0, "r6": 5}
    sync, over = both(tiny_net, work, abort_after)
    for rid, n in abort_after.items():
        assert over.streams[rid].reason == "abort" and len(over.streams[rid].tokens) == n
    assert over.overlapped_steps > 0


def adoption(net, rid: str, prompt: list[int], params: SamplingParams, **kw):
    """What a decode worker does with a request a prefill worker prefilled (test_handoff.handoff): an
    engine of its own prefills it (prefill_only), the blocks are copied into blocks reserved on the
    decode engine, which adopts it (with MTP, with the MTP state). Returns the action for `drive` (it
    returns the first token)."""

    def adopt(b: Engine) -> int:
        a = make_engine(net, True, **kw)
        req = a.add_request(rid, prompt, params, prefill_only=True)
        while not req.is_finished:
            a.step()
        blocks = b.reserve(len(prompt) + 1 + b.mtp_k)
        n = -(-len(prompt) // a.cfg.block_size)
        for src, dst in zip(a.pool.pools(), b.pool.pools()):
            dst[blocks[:n]] = src[req.block_table[:n]]
        first = req.output_ids[0]
        hidden = req.pending_hidden[-1] if req.pending_hidden is not None else None
        b.adopt_prefilled(rid, prompt, params, blocks, first, None, hidden, req.generator.get_state())
        a.release_prefilled(rid)
        assert a.blocks_used == 0
        return first

    return adopt


def test_requests_adopted_while_others_decode(tiny_net) -> None:
    """The decode worker's path: requests prefilled elsewhere join a batch whose steps overlap (their
    first input token comes from the host, the others' from the step in flight); one finishes on its
    first token (the synchronous step reports it)."""
    prompts = random_prompts([12, 30, 21, 9, 17], tiny_net.cfg.vocab_size, seed=8)
    greedy = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, logprobs=1)
    seeded = SamplingParams(temperature=0.9, top_p=0.95, max_tokens=13, ignore_eos=True, seed=21)
    one = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    work = [
        (0, "local0", prompts[0], greedy),
        (0, "local1", prompts[1], seeded),
        (4, "adopted2", adoption(tiny_net, "adopted2", prompts[2], seeded), seeded),
        (7, "adopted3", adoption(tiny_net, "adopted3", prompts[3], one), one),
        (9, "adopted4", adoption(tiny_net, "adopted4", prompts[4], greedy), greedy),
    ]
    sync, over = both(tiny_net, work)
    assert over.streams["adopted3"].reason == "length" and len(over.streams["adopted3"].tokens) == 1
    assert over.overlapped_steps > 10


def test_preemption_falls_back_and_gives_the_same_output(tiny_net) -> None:
    prompts = random_prompts([30, 30, 30, 30], tiny_net.cfg.vocab_size, seed=2)
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    work = [(0, f"r{i}", p, params) for i, p in enumerate(prompts)]
    tight = make_engine(tiny_net, True, num_blocks=20, prefix_cache=False)
    over = drive(tight, work)
    assert tight.scheduler.num_preemptions > 0 and over.overlapped_steps > 0
    roomy = drive(make_engine(tiny_net, False), work)
    assert_same(roomy, over)


def test_penalties_run_synchronously_with_the_same_output(tiny_net) -> None:
    prompts = random_prompts([12, 25], tiny_net.cfg.vocab_size, seed=4)
    params = SamplingParams(temperature=0.9, max_tokens=10, ignore_eos=True, seed=2, repetition_penalty=1.3)
    sync, over = both(tiny_net, [(0, f"r{i}", p, params) for i, p in enumerate(prompts)])
    assert over.overlapped_steps == 0


def test_where_overlap_is_on(tiny_net, predictable_net) -> None:
    assert make_engine(tiny_net, True).overlap is not None
    assert make_engine(tiny_net, None).overlap is None  # a CPU cache: off unless asked for
    assert make_engine(tiny_net, True, paged_kernels=False).overlap is None  # rows come from a row plan
    assert make_engine(predictable_net, True, mtp_draft_tokens=1).overlap is not None  # the fused MTP step
    relaxed = dict(mtp_draft_tokens=2, mtp_relaxed_topk=3, mtp_relaxed_delta=0.5, think_token_ids=(5, 6))
    assert make_engine(predictable_net, True, **relaxed).overlap is None  # the thinking state is the host's


# ---- with MTP: the fused speculative step, fed on the device from the step in flight -------------------
def hidden_reading(net):
    """make_predictable, and the MTP layer also reads the main model's hidden state (eh_proj's second
    half a scaled identity): drafts depend on the hidden states a step feeds the next one, and are
    still accepted often."""
    from splitserve.tests.tp_workers import make_predictable

    make_predictable(net)
    h = net.cfg.hidden_size
    with torch.no_grad():
        net.mtp.eh_proj.weight[:, h:] = 0.5 * torch.eye(h)
    return net


@pytest.fixture(scope="module")
def mtp_net(tiny_checkpoint):
    from splitserve.model import load

    return hidden_reading(load(tiny_checkpoint, dtype=torch.float32))


def mtp_workload(net, stops: tuple[int, int] = (0, 0)) -> list[tuple[int, str, list[int], SamplingParams]]:
    """Requests the fused step takes (no logprobs, logit_bias or penalties): greedy and seeded sampling,
    stop tokens, max_tokens reached inside a step's accepted drafts, arrivals while others decode."""
    prompts = random_prompts([5, 23, 40, 9, 31, 14, 3, 18, 11], net.cfg.vocab_size, seed=7)
    params = [
        SamplingParams(temperature=0.0, max_tokens=14, ignore_eos=True),
        SamplingParams(temperature=0.8, top_p=0.9, max_tokens=17, seed=3, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True, stop_token_ids=(stops[0],)),
        SamplingParams(temperature=1.0, top_k=20, max_tokens=21, seed=5, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=25, stop_token_ids=(stops[1],)),
        SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True),  # finished by its prefill's token
        SamplingParams(temperature=0.7, min_p=0.05, max_tokens=11, seed=11, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True),
        SamplingParams(temperature=0.9, max_tokens=19, seed=4, stop_token_ids=(stops[0],)),
    ]
    calls = [0, 0, 2, 5, 9, 9, 14, 30, 33]
    return [(c, f"r{i}", p, sp) for i, (c, p, sp) in enumerate(zip(calls, prompts, params))]


def mtp_stops(net, k: int, **kw) -> tuple[int, int]:
    """Stop tokens that greedy requests r2 and r4 do generate (their 20th and 15th tokens without stops,
    when the batch is full and steps overlap)."""
    free = drive(make_engine(net, False, mtp_draft_tokens=k, **kw), mtp_workload(net)).streams
    return free["r2"].tokens[19], free["r4"].tokens[14]


def accepted(run: Run) -> int:
    return sum(s.drafts[1] for s in run.streams.values())


@pytest.mark.parametrize("k", [1, 3])
def test_the_device_feed_plans_what_the_host_plans_after_reading_the_step(mtp_net, k) -> None:
    """SpecStep._feed (a step's rows planned on the device from the step before it) writes the plan and
    the MTP layer's input states that _fill computes on the host once that step's results are read
    (as Overlap._apply reads them), padding slots and row order included."""
    from splitserve.engine.spec_step import eligible

    net, r = mtp_net, k + 1
    eng = make_engine(net, False, mtp_draft_tokens=k)
    params = SamplingParams(temperature=0.0, max_tokens=60, ignore_eos=True)
    for i, p in enumerate(random_prompts([5, 23, 40, 9, 17, 12], net.cfg.vocab_size, seed=1)):
        eng.add_request(f"r{i}", p, params)
    for _ in range(5):  # prefills, then synchronous decode steps
        eng.step()
    reqs = list(eng.scheduler.running)
    assert all(q.in_decode and eligible(q) for q in reqs)
    spec, n = eng.runner.spec, len(reqs)
    base = [q.num_computed for q in reqs]
    for q, nc in zip(reqs, base):  # N's blocks and N+1's worst case, as Overlap._launch_spec grows them
        assert eng.scheduler.grow(q, nc + 2 * r)
    prev = eng.runner.launch_spec(reqs, [], None)  # step N, planned from the host
    order = reqs[::-1]  # step N+1's rows in another order than N's
    fed = [(i, n - 1 - i, base[n - 1 - i]) for i in range(n)]
    spec._fill(order, n, False, frozenset(range(n)))
    spec._feed(n, fed, prev)
    planned = spec.plan[: spec.nf * n * r].clone(), spec.hidden_in[: n * r].clone()
    got = prev.host.tolist()
    for i, q in enumerate(reqs):  # read step N as Overlap._apply does
        a = got[i][0]
        q.mtp_computed = q.num_computed
        q.pending_hidden = prev.hidden[i * r : i * r + a + 1]
        q.num_computed += a + 1
        q.output_ids += got[i][1 : a + 2]
    spec._fill(order, n, False)
    assert torch.equal(spec.plan[: spec.nf * n * r], planned[0])
    assert torch.equal(spec.hidden_in[: n * r], planned[1])
    accepted = {row[0] for row in got}
    assert len(accepted) > 1  # rows with different accepted counts (pending slots and padding differ)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_mtp_overlapped_engine_streams_what_the_synchronous_one_does(mtp_net, k) -> None:
    net = mtp_net
    sync, over = both(net, mtp_workload(net, mtp_stops(net, k)), mtp_draft_tokens=k)
    assert sync.streams["r2"].reason == "stop" and sync.streams["r4"].reason == "stop"
    assert over.overlapped_steps > 10
    assert over.deferred_frees > 0  # a stop token finished a request whose next row was in flight
    assert 0 < accepted(over) < sum(s.drafts[0] for s in over.streams.values())


def test_mtp_full_batch_and_aborts(mtp_net) -> None:
    net = mtp_net
    work = mtp_workload(net, mtp_stops(net, 2))
    sync, over = both(net, work, max_running=3, mtp_draft_tokens=2)
    assert over.overlapped_steps > 10
    abort_after = {"r0": 3, "r1": 1, "r3": 0, "r6": 5}
    sync, over = both(net, work, abort_after, mtp_draft_tokens=2)
    for rid in abort_after:
        assert over.streams[rid].reason == "abort"
    assert over.overlapped_steps > 0


def test_mtp_steps_the_fused_step_cannot_take_run_synchronously(mtp_net) -> None:
    """A request with logprobs (or a logit_bias) sends the steps it is in through the per-phase path,
    synchronously; the others overlap before it arrives and after it leaves."""
    net = mtp_net
    work = mtp_workload(net)
    work.append(
        (
            6,
            "lp",
            random_prompts([13], net.cfg.vocab_size, seed=9)[0],
            SamplingParams(temperature=0.0, max_tokens=5, logprobs=2),
        )
    )
    work.append((30, "bias", [3, 4, 5], SamplingParams(temperature=0.0, max_tokens=6, logit_bias={9: 3.0})))
    sync, over = both(net, work, mtp_draft_tokens=2)
    assert len(over.streams["lp"].logprobs) == 5
    assert over.overlapped_steps > 5


def test_mtp_requests_adopted_while_others_decode(mtp_net) -> None:
    net = mtp_net
    prompts = random_prompts([12, 30, 21, 9, 17], net.cfg.vocab_size, seed=8)
    greedy = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    seeded = SamplingParams(temperature=0.9, top_p=0.95, max_tokens=13, ignore_eos=True, seed=21)
    one = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    kw = dict(mtp_draft_tokens=2)
    work = [
        (0, "local0", prompts[0], greedy),
        (0, "local1", prompts[1], seeded),
        (4, "adopted2", adoption(net, "adopted2", prompts[2], seeded, **kw), seeded),
        (7, "adopted3", adoption(net, "adopted3", prompts[3], one, **kw), one),
        (9, "adopted4", adoption(net, "adopted4", prompts[4], greedy, **kw), greedy),
    ]
    sync, over = both(net, work, **kw)
    assert over.streams["adopted3"].reason == "length" and len(over.streams["adopted3"].tokens) == 1
    assert over.overlapped_steps > 5 and accepted(over) > 0


def test_mtp_preemption_and_the_context_end(mtp_net) -> None:
    """Too few blocks for the worst case: steps fall back (preemption) with the same output; requests
    that reach max_model_len inside a step's accepted drafts stop there."""
    net = mtp_net
    prompts = random_prompts([30, 30, 30, 30], net.cfg.vocab_size, seed=2)
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    work = [(0, f"r{i}", p, params) for i, p in enumerate(prompts)]
    tight = make_engine(net, True, num_blocks=24, prefix_cache=False, mtp_draft_tokens=2)
    over = drive(tight, work)
    assert tight.scheduler.num_preemptions > 0 and over.overlapped_steps > 0
    assert_same(drive(make_engine(net, False, mtp_draft_tokens=2), work), over, drafts=False)
    sync, over = both(net, work, max_model_len=45, mtp_draft_tokens=3)
    assert all(len(s.tokens) == 15 and s.reason == "length" for s in over.streams.values())
    assert over.overlapped_steps > 0


# ---- on a GPU: the Triton kernels, CUDA graphs, the device-side token feed, events ------------------
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def kernel_net(tmp_path_factory):
    from .test_engine_cuda import _kernel_net

    return _kernel_net(tmp_path_factory, torch.float32)


@cuda
@pytest.mark.parametrize("warm", [False, True], ids=["captured-on-use", "warm-up"])
def test_overlap_on_cuda_with_graphs_streams_what_sync_does(kernel_net, warm) -> None:
    kw = dict(num_blocks=160, block_size=16, chunk_size=128, max_batch_tokens=2048, device="cuda", paged_kernels=None)
    work = mixed_workload(kernel_net)
    runs = {}
    for overlap in (False, True):
        eng = make_engine(kernel_net, overlap, **kw)
        assert eng.runner.graphs is not None and (eng.overlap is not None) == overlap
        if warm:
            eng.warm_up()
        runs[overlap] = drive(eng, work, {"r1": 4, "r6": 2})
        assert eng.runner.graphs.graphs, "decode steps did not replay CUDA graphs"
        if warm:
            assert eng.graph_stats["graph_misses_after_ready"] == 0
    assert_same(runs[False], runs[True])
    assert runs[True].overlapped_steps > 10


@cuda
def test_overlap_is_on_by_default_on_cuda(kernel_net) -> None:
    eng = Engine(kernel_net, EngineConfig(num_blocks=32, block_size=16, device="cuda"))
    assert eng.overlap is not None


@pytest.fixture(scope="module")
def kernel_mtp_net(tmp_path_factory):
    from .test_engine_cuda import _kernel_net

    return hidden_reading(_kernel_net(tmp_path_factory, torch.float32))


@cuda
@pytest.mark.parametrize("k,warm", [(1, False), (3, True)], ids=["k1-captured-on-use", "k3-warm-up"])
def test_mtp_overlap_on_cuda_with_graphs_streams_what_sync_does(kernel_mtp_net, k, warm) -> None:
    """The fused step's graphs, fed on the device from the step in flight, against the synchronous one
    (max_running 8: fewer graphs to capture; the 9th request waits for a slot)."""
    net = kernel_mtp_net
    kw = dict(
        num_blocks=160,
        block_size=16,
        chunk_size=128,
        max_batch_tokens=2048,
        max_running=8,
        device="cuda",
        paged_kernels=None,
    )
    work = mtp_workload(net, mtp_stops(net, k, **kw))
    runs = {}
    for overlap in (False, True):
        eng = make_engine(net, overlap, mtp_draft_tokens=k, **kw)
        spec = eng.runner.spec
        assert spec is not None and spec.use_graphs and (eng.overlap is not None) == overlap
        if warm:
            eng.warm_up()
        runs[overlap] = drive(eng, work, {"r1": 4, "r6": 2})
        assert spec.graphs, "the speculative steps did not replay CUDA graphs"
        if warm:
            assert eng.graph_stats["graph_misses_after_ready"] == 0
    assert_same(runs[False], runs[True])
    assert runs[True].overlapped_steps > 10 and accepted(runs[True]) > 0
