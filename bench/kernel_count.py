"""Kernel launches per decode step and per decoder layer, from torch.profiler's device events.

`splitserve bench engine --profile 1,64` prints them beside the kernel-time table (bench/engine.py):

    kernels per step: 212 (graph replay; + 3 memcpy/memset)
    per decoder layer (eager): 0 dense 38 | 1 moe 45 | ...
    layer 1 by kernel: 4 x _fp8_gemv_kernel, 2 x ...

A step's count comes from replaying its CUDA graph (the kernels the GPU runs); a layer's from calling
that layer alone, eagerly, on the step's own inputs (captured by a forward pre-hook in one eager
forward); the same kernels a graph of it would hold.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import torch


def _device_kernels(prof: Any) -> tuple[Counter[str], int]:
    """(kernel name -> launches, memcpy/memset count) over a profile's device events."""
    kernels: Counter[str] = Counter()
    copies = 0
    for e in prof.events():
        if e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        if e.name.startswith(("Memcpy", "Memset")):
            copies += 1
        else:
            kernels[e.name] += 1
    return kernels, copies


def count_kernels(fn: Callable[[], Any], iters: int = 3) -> tuple[Counter[str], int]:
    """Kernel launches per call of fn (by name; averaged over iters) and memcpy/memset per call."""
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    fn()
    if cuda:
        torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        for _ in range(iters):
            fn()
        if cuda:
            torch.cuda.synchronize()
    kernels, copies = _device_kernels(prof)
    return Counter({k: round(v / iters) for k, v in kernels.items()}), round(copies / iters)


def layer_kernels(net: Any, batch: Any) -> list[dict[str, Any]]:
    """Kernels of each main decoder layer, eager, on the inputs one eager forward over `batch` gives it."""
    captured: dict[int, tuple[Any, ...]] = {}
    layers = list(net.model.layers[: net.cfg.num_hidden_layers])
    hooks = [
        layer.register_forward_pre_hook(lambda _m, args, i=i: captured.__setitem__(i, args))
        for i, layer in enumerate(layers)
    ]
    try:
        net.forward(batch)
    finally:
        for h in hooks:
            h.remove()
    out = []
    for i, layer in enumerate(layers):
        args = captured[i]

        def call(layer=layer, args=args) -> None:
            with torch.inference_mode():
                layer(*args)

        kernels, copies = count_kernels(call, iters=1)
        kind = "moe" if net.cfg.is_moe_layer(i) else "dense"
        out.append({"layer": i, "kind": kind, "kernels": sum(kernels.values()), "copies": copies, "by_name": kernels})
    return out


def report(step: Counter[str], step_copies: int, layers: list[dict[str, Any]], top: int = 40) -> str:
    lines = [
        f"kernels per step: {sum(step.values())} (graph replay; + {step_copies} memcpy/memset)",
        "per decoder layer (eager): " + " | ".join(f"{r['layer']} {r['kind']} {r['kernels']}" for r in layers),
    ]
    seen = set()
    for r in layers:
        if r["kind"] in seen:
            continue
        seen.add(r["kind"])
        names = sorted(r["by_name"].items(), key=lambda kv: -kv[1])[:top]
        lines.append(f"layer {r['layer']} ({r['kind']}) by kernel:")
        lines += [f"  {n:3d} x {name[:110]}" for name, n in names]
    return "\n".join(lines)
