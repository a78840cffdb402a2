"""MTP speculative decoding: what a step costs, what its parts cost against their own rooflines, and what
it would buy the real 61-layer model. Run from bench/engine.py (`--only mtp`, `--only cpu-mtp`).

GPU (bench preset, random weights, context 1024, batch 1 and 32, one run):

* step: the engine's decode step (wall time per `Engine.step()`, host included) without MTP and with
  k = 1, 2, 3 drafts: the fused speculative step of engine/spec_step.py (one CUDA graph, one host copy).
* parts, each replayed from a CUDA graph of its own:
  - draft: the MTP layer over B rows + LM head + argmax (what drafts 2..k each cost inside the step);
    roofline bytes = the MTP layer's weights other than the routed experts + the routed experts its B
    rows select (counted from the router's selections) + the LM head + the cache its rows read;
  - verify: the main model over B x (k + 1) rows + LM head + argmax; roofline bytes = the main model's
    weights other than the routed experts + the LM head + per MoE layer the experts those rows select
    (counted) + the cache the rows read (per row, as bench/engine.py's decode floor);
  over the HBM copy bandwidth measured in the same run. Goals: draft <= 1.3x, verify <= 1.1x.
  - per-layer times (dense layer, MoE layer, MTP layer without its head, LM head + argmax) at 1 and k + 1
    rows per request, for the projection.
* projection to the real model (61 layers: 3 dense + 58 MoE, 256 routed experts, 8 active), batch 1:
      T_0 = 3 t_dense(1) + 58 t_moe'(1) + t_head(1) + o_0
      T_k = t_mtp'(k+1) + (k-1) t_mtp'(1) + k t_head(1) + 3 t_dense(k+1) + 58 t_moe'(k+1) + t_head(k+1) + o_k
      speedup_k = E_k T_0 / T_k,  E_k = 1 + a_1 + a_1 a_2 + ... + a_1..a_k   (tokens per step)
  t_x(r) is a measured per-layer time at r rows; t_moe'(r) / t_mtp'(r) scale the measured MoE / MTP layer
  time by real bytes / bench bytes, the real layer touching 256 (1 - (1 - 8/256)^r) experts where the
  bench layer touched the counted number (the bench preset has 16 experts, so k + 1 rows touch fewer
  there than in the real model); o_k = the measured engine step minus the sum of its measured parts at
  the bench preset (embedding, norms, sampling/acceptance, host work and the one host copy), carried over
  as is. a_i = `--acceptance` (one value: a_i = a for every i; or a list: the acceptance of draft i given
  drafts 1..i-1 were accepted, as measured on the trained model).

CPU (`--only cpu-mtp --device cpu --checkpoint DIR`): the measured greedy decode speed of a checkpoint with
MTP k = 0..3 on a prompt: tokens/s of the decode phase, accept length (tokens per decode step),
acceptance, speedup over k = 0, and whether the tokens equal k = 0's (they must: greedy MTP is lossless).
"""

from __future__ import annotations

import time
from typing import Any

import torch

from splitserve.engine.cache import CachePool
from splitserve.engine.config import EngineConfig
from splitserve.engine.engine import Engine
from splitserve.engine.rows import RowPlan
from splitserve.engine.sampling_params import SamplingParams
from splitserve.model import DeepseekV32
from splitserve.model.moe import Gate

REAL_LAYERS, REAL_DENSE, REAL_EXPERTS, REAL_ACTIVE = 61, 3, 256, 8


def tokens_per_step(acceptance: list[float], k: int) -> float:
    """E_k = 1 + a_1 + a_1 a_2 + ... (a list shorter than k repeats its last value)."""
    total, run = 1.0, 1.0
    for i in range(k):
        run *= acceptance[min(i, len(acceptance) - 1)]
        total += run
    return total


def _nbytes(params) -> float:
    return float(sum(p.numel() * p.element_size() for p in params))


def _routed(name: str) -> bool:
    return name.endswith(("mlp.w13", "mlp.w2", "mlp.w13_scale_inv", "mlp.w2_scale_inv"))


class ExpertCounter:
    """Forward hooks on every router: the distinct experts each MoE layer selected (eager runs only)."""

    def __init__(self, net: DeepseekV32) -> None:
        self.seen: dict[int, set[int]] = {}
        self.handles = []
        for i, layer in enumerate(net.model.layers):
            for m in layer.modules():
                if isinstance(m, Gate):
                    self.handles.append(m.register_forward_hook(self._hook(i)))

    def _hook(self, layer: int):
        def hook(_m, _inp, out) -> None:
            self.seen.setdefault(layer, set()).update(out[1].flatten().tolist())

        return hook

    def __enter__(self) -> ExpertCounter:
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()


class Parts:
    """Per-part timings over one pool: rows at context `context` for `batch` requests."""

    def __init__(self, net: DeepseekV32, pool: CachePool, context: int, batch: int, timer, block: int) -> None:
        self.net, self.pool, self.context, self.batch, self.timer, self.block = net, pool, context, batch, timer, block
        per = -(-(context + 8) // block)
        self.tables = [list(range(1 + b * per, 1 + (b + 1) * per)) for b in range(batch)]
        cfg = net.cfg
        self.expert_bytes = {}
        for i, layer in enumerate(net.model.layers):
            routed = [p for n, p in layer.named_parameters() if _routed(n)]
            if routed:
                self.expert_bytes[i] = _nbytes(routed) / cfg.n_routed_experts
        self.layer_other_bytes = {
            i: _nbytes([p for n, p in layer.named_parameters() if not _routed(n)])
            for i, layer in enumerate(net.model.layers)
        }

    def batch_of(self, per_req: int):
        ids = torch.randint(2, self.net.cfg.vocab_size, (self.batch * per_req,)).tolist()
        groups = [(ids[b * per_req : (b + 1) * per_req], self.context, self.tables[b]) for b in range(self.batch)]
        return RowPlan.build(groups, self.block).to_batch(self.pool)

    def count(self, fn) -> dict[int, int]:
        with ExpertCounter(self.net) as c:
            fn()
        return {i: len(s) for i, s in c.seen.items()}


def graph_ms(fn, timer, cuda: bool) -> float:
    """Median time of `fn` replayed from a CUDA graph of its own (CPU: called)."""
    if not cuda:
        return timer(fn)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    ms = timer(g.replay)
    del g
    return ms


def parts_case(
    net: DeepseekV32, pool: CachePool, ceil: dict[str, Any], batch: int, k: int, context: int, timer, block: int
) -> dict[str, Any]:
    """Draft and verification against their rooflines, and the per-layer times at 1 and k + 1 rows."""
    from splitserve.bench.engine import cache_bytes_per_row  # bench/engine.py owns the cache byte model

    cfg = net.cfg
    cuda = pool.latent.is_cuda
    bw = ceil["hbm_copy_bytes_per_s"]
    parts = Parts(net, pool, context, batch, timer, block)
    r = k + 1
    b1, br = parts.batch_of(1), parts.batch_of(r)
    h = net.cfg.hidden_size
    x1 = torch.randn(batch, h, dtype=net.dtype, device=pool.latent.device) * 0.5
    xr = torch.randn(batch * r, h, dtype=net.dtype, device=pool.latent.device) * 0.5
    mtp_i = cfg.num_hidden_layers
    lm_bytes = float(net.lm_head.weight.nbytes)
    layers = list(net.model.layers)
    cos1, sin1 = net._cos_sin(b1.positions)
    cosr, sinr = net._cos_sin(br.positions)

    def draft():
        return net.logits(net.mtp_forward(x1, b1.input_ids, b1)).argmax(-1)

    def verify():
        return net.logits(net.forward(br)).argmax(-1)

    out: dict[str, Any] = {"batch": batch, "k": k, "context": context}
    with torch.inference_mode():
        # draft: MTP layer over B rows + LM head
        sel = parts.count(draft)
        d_bytes = (
            parts.layer_other_bytes[mtp_i]
            + sel.get(mtp_i, 0) * parts.expert_bytes.get(mtp_i, 0.0)
            + lm_bytes
            + batch * cache_bytes_per_row(cfg, context + 1, cfg.index_topk, 1)
        )
        t = graph_ms(draft, timer, cuda)
        out.update(
            draft_ms=t,
            draft_experts=sel.get(mtp_i, 0),
            draft_floor_ms=d_bytes / bw * 1e3,
            draft_vs_roofline=t / (d_bytes / bw * 1e3),
        )
        # verification: main model over B x (k + 1) rows + LM head
        sel = parts.count(verify)
        main = range(cfg.num_hidden_layers)
        v_bytes = (
            sum(parts.layer_other_bytes[i] for i in main)
            + float(net.model.norm.weight.nbytes)
            + lm_bytes
            + sum(sel.get(i, 0) * parts.expert_bytes.get(i, 0.0) for i in main)
            + batch * r * cache_bytes_per_row(cfg, context + r, cfg.index_topk, cfg.num_hidden_layers)
        )
        t = graph_ms(verify, timer, cuda)
        out.update(
            verify_ms=t,
            verify_experts=sum(sel.get(i, 0) for i in main),
            verify_floor_ms=v_bytes / bw * 1e3,
            verify_vs_roofline=t / (v_bytes / bw * 1e3),
        )
        # per-layer times and bytes at 1 and k + 1 rows per request
        dense_i = 0 if cfg.first_k_dense_replace > 0 else None
        moe_i = next(i for i in main if i in parts.expert_bytes)
        for tag, bt, x, cos, sin in (("1", b1, x1, cos1, sin1), ("r", br, xr, cosr, sinr)):
            rows = x.shape[0]
            if dense_i is not None:
                out[f"t_dense_{tag}"] = graph_ms(lambda: layers[dense_i](x, bt, cos, sin), timer, cuda)
            out[f"t_moe_{tag}"] = graph_ms(lambda: layers[moe_i](x, bt, cos, sin), timer, cuda)
            out[f"t_mtp_{tag}"] = graph_ms(lambda: net.mtp_forward(x, bt.input_ids, bt), timer, cuda)
            out[f"t_head_{tag}"] = graph_ms(lambda: net.logits(x).argmax(-1), timer, cuda)
            sel = parts.count(lambda: (layers[moe_i](x, bt, cos, sin), net.mtp_forward(x, bt.input_ids, bt)))
            cache = rows * cache_bytes_per_row(cfg, context + 1, cfg.index_topk, 1)
            for name, i in (("moe", moe_i), ("mtp", mtp_i)):
                other = parts.layer_other_bytes[i] + cache
                eb = parts.expert_bytes.get(i, 0.0)
                real_sel = REAL_EXPERTS * (1 - (1 - REAL_ACTIVE / REAL_EXPERTS) ** rows)
                out[f"experts_{name}_{tag}"] = sel.get(i, 0)
                out[f"scale_{name}_{tag}"] = (other + real_sel * eb) / (other + sel.get(i, 0) * eb)
    return out


def project(parts: dict[str, Any], step0_ms: float, step_k_ms: float, cfg, acceptance: list[float]) -> dict[str, Any]:
    """Batch-1 projection of the real 61-layer model from the bench preset's measured parts (module docstring)."""
    k = parts["k"]
    dense_b = cfg.first_k_dense_replace
    moe_b = cfg.num_hidden_layers - dense_b
    td1, tdr = parts.get("t_dense_1", 0.0), parts.get("t_dense_r", 0.0)
    tm1, tmr = parts["t_moe_1"], parts["t_moe_r"]
    tx1, txr = parts["t_mtp_1"], parts["t_mtp_r"]
    th1, thr = parts["t_head_1"], parts["t_head_r"]
    o0 = step0_ms - (dense_b * td1 + moe_b * tm1 + th1)
    measured_k = txr + (k - 1) * tx1 + k * th1 + dense_b * tdr + moe_b * tmr + thr
    ok = step_k_ms - measured_k
    real_moe = REAL_LAYERS - REAL_DENSE
    t0 = REAL_DENSE * td1 + real_moe * tm1 * parts["scale_moe_1"] + th1 + o0
    tk = (
        txr * parts["scale_mtp_r"]
        + (k - 1) * tx1 * parts["scale_mtp_1"]
        + k * th1
        + REAL_DENSE * tdr
        + real_moe * tmr * parts["scale_moe_r"]
        + thr
        + ok
    )
    e = tokens_per_step(acceptance, k)
    return {
        "k": k,
        "overhead_0_ms": o0,
        "overhead_k_ms": ok,
        "real_step0_ms": t0,
        "real_stepk_ms": tk,
        "tokens_per_step": e,
        "projected_speedup": e * t0 / tk,
    }


# ---------------------------------------------------------------------------------------------
# CPU: the measured speedup of a checkpoint
# ---------------------------------------------------------------------------------------------
def cpu_speedup(
    checkpoint: str, prompt: str, max_tokens: int, ks: list[int], paged: bool, threads: int = 1, repeats: int = 3
) -> list[dict[str, Any]]:
    """Greedy decode speed of `checkpoint` on `prompt` for each k (best of `repeats` runs, the ks
    interleaved, on `threads` torch threads: small models on shared cores lose most to thread contention)."""
    from splitserve.model import load
    from splitserve.model.presets import resolve_checkpoint
    from splitserve.model.tokenizer import load_tokenizer

    torch.set_num_threads(threads)
    path = resolve_checkpoint(checkpoint)
    net = load(path, device="cpu", dtype=torch.float32)
    ids = load_tokenizer(path).encode(prompt, add_special_tokens=False).ids
    if net.cfg.bos_token_id is not None:
        ids = [net.cfg.bos_token_id] + ids
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    if any(k for k in ks) and not net.has_mtp:
        raise SystemExit(f"{path} has no MTP layer: MTP cannot run")
    engines = {}
    for k in ks:
        need = -(-(len(ids) + max_tokens + k + 1) // 64) + 2
        cfg = EngineConfig(num_blocks=need, block_size=64, mtp_draft_tokens=k, paged_kernels=paged, prefix_cache=False)
        engines[k] = Engine(net, cfg)
        engines[k].generate([ids], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))  # warm
    best: dict[int, dict[str, Any]] = {}
    for rep in range(repeats):
        for k in ks:
            eng = engines[k]
            req = eng.add_request(f"cpu-{k}-{rep}", ids, params)
            while not req.output_ids:  # prefill and the first token
                eng.step()
            first = len(req.output_ids)
            steps, t = 0, time.perf_counter()
            while not req.is_finished:
                eng.step()
                steps += 1
            secs = time.perf_counter() - t
            made = len(req.output_ids) - first
            row = {
                "k": k,
                "decode_tokens": made,
                "decode_steps": steps,
                "decode_tokens_per_s": made / secs,
                "accept_length": made / steps if steps else None,
                "acceptance": req.accepted_draft_tokens / req.draft_tokens if req.draft_tokens else None,
                "tokens": list(req.output_ids),
            }
            if k not in best or row["decode_tokens_per_s"] > best[k]["decode_tokens_per_s"]:
                best[k] = row
    rows = [best[k] for k in ks]
    ref = rows[0]["tokens"]
    for row in rows:
        row["same_tokens_as_k0"] = row.pop("tokens") == ref
        row["speedup_vs_k0"] = row["decode_tokens_per_s"] / rows[0]["decode_tokens_per_s"]
    return rows
