"""Programmatic dependent launch (kernels/_common.py PDL): on Hopper every Triton kernel of ours launches with
it and waits for the kernel before it as its first statement, so a chain of dependent kernels, eager or
replayed from a CUDA graph, computes exactly what plain launches compute."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from splitserve.kernels import _common, norm

pytest.importorskip("triton")
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def hopper() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9


def test_launch_options(device, monkeypatch):
    """On: a compiled kernel on a CUDA GPU of compute capability 9 or later. Off: the CPU, the interpreter,
    older GPUs, PDL = False (and then the kernel's PDL constexpr keeps its default, False)."""
    x = torch.zeros(4, device=device)
    on = device == "cuda" and hopper() and not _common.interpreting(norm._rms_norm_kernel)
    assert _common.pdl(norm._rms_norm_kernel, x) == ({"PDL": True, "launch_pdl": True} if on else {})
    assert _common.pdl(norm._rms_norm_kernel, torch.zeros(4)) == {}
    monkeypatch.setattr(_common, "PDL", False)
    assert _common.pdl(norm._rms_norm_kernel, x) == {}


def _chain(x, r, w, steps):
    """steps fused residual-add RMSNorms, each reading what the one before wrote."""
    for _ in range(steps):
        x, r = norm.rms_norm_triton(x, w, 1e-6, r)
    return x, r


@gpu
@pytest.mark.skipif(not hopper(), reason="programmatic dependent launch needs compute capability 9 or later")
def test_dependent_kernels_under_pdl_equal_plain_launches(monkeypatch):
    """64 dependent kernels (each small, so the next one's programs are resident while it runs), eager and as a
    CUDA graph replayed several times, with PDL against plain launches: bitwise equal. A kernel that read its
    input before the one producing it had finished would read the previous step's values."""
    g = torch.Generator(device="cuda").manual_seed(0)
    x0 = torch.randn(8, 7168, device="cuda", generator=g).bfloat16()
    r0 = torch.randn(8, 7168, device="cuda", generator=g).bfloat16()
    w = (1 + 0.1 * torch.randn(7168, device="cuda", generator=g)).bfloat16()
    monkeypatch.setattr(_common, "PDL", False)
    want = _chain(x0, r0, w, 64)
    monkeypatch.setattr(_common, "PDL", True)
    assert all(torch.equal(a, b) for a, b in zip(_chain(x0, r0, w, 64), want))

    x, r = x0.clone(), r0.clone()
    _chain(x, r, w, 64)  # compiled before capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = _chain(x, r, w, 64)
    for _ in range(5):
        x.copy_(x0)
        r.copy_(r0)
        graph.replay()
        torch.cuda.synchronize()
        assert all(torch.equal(a, b) for a, b in zip(out, want))


KERNELS = Path(_common.__file__).parent


def _is_jit(fn: ast.FunctionDef) -> bool:
    return any(ast.unparse(d) in ("triton.jit", "gluon.jit") for d in fn.decorator_list)


def test_every_kernel_taking_pdl_waits_first_and_every_launch_names_its_own_kernel():
    """The rule PDL's correctness rests on, read from the source of kernels/: a @triton.jit kernel with a PDL
    parameter runs pdl_start(PDL) before anything else (after its docstring), and a launch `k[grid](...,
    **pdl(j, x))` passes the kernel it launches (j is k) and one that takes PDL. A kernel that read memory
    before waiting would race under PDL, and no single GPU run is sure to show it."""
    takes_pdl, launched_names = set(), []
    for path in sorted(KERNELS.glob("*.py")):
        tree = ast.parse(path.read_text())
        for fn in ast.walk(tree):
            if (
                isinstance(fn, ast.FunctionDef)
                and _is_jit(fn)
                and fn.name != "pdl_start"
                and "PDL" in [a.arg for a in fn.args.args]
            ):
                takes_pdl.add(fn.name)
                body = fn.body[1:] if ast.get_docstring(fn) is not None else fn.body
                assert ast.unparse(body[0]) == "pdl_start(PDL)", f"{path.name}:{fn.name} does not wait first"
        for call in ast.walk(tree):
            if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Subscript)):
                continue
            for kw in call.keywords:
                if kw.arg is None and isinstance(kw.value, ast.Call) and ast.unparse(kw.value.func) == "pdl":
                    launched, named = ast.unparse(call.func.value), ast.unparse(kw.value.args[0])
                    assert launched == named, f"{path.name}: launches {launched} with pdl({named}, ...)"
                    launched_names.append(launched)
    assert len(launched_names) >= 20 and len(takes_pdl) >= 20  # the rule was checked on the kernels
    aliases = {}  # the launch sites' local names for kernels (k1, k2, kern) and what they are bound to
    for path in sorted(KERNELS.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Assign) and len(node.targets) == 1:
                target, value = node.targets[0], node.value
                if isinstance(target, ast.Tuple) != isinstance(value, ast.Tuple):
                    continue
                pairs = zip(target.elts, value.elts) if isinstance(target, ast.Tuple) else [(target, value)]
                for t, v in pairs:
                    if isinstance(t, ast.Name) and ast.unparse(v).endswith("_kernel"):
                        aliases.setdefault(t.id, set()).add(ast.unparse(v))
    assert {"k1", "k2", "kern"} <= aliases.keys()
    for name, values in aliases.items():
        assert values <= takes_pdl, f"{name} = {values}: not a kernel that takes PDL"
    for name in launched_names:
        assert name in takes_pdl or name in aliases, f"{name} is launched with pdl() but takes no PDL"
