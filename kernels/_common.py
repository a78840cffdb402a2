"""What every kernel module shares: the optional Triton import, the dispatch rule, programmatic dependent
launch, and the split-K sum of the GEMMs that split their K dimension over programs (fp8_gemm, fp32_gemm).

Dispatch rule (one place, no environment switches of ours): a dispatched function runs its Triton
kernel when Triton is importable and its first tensor argument lives on a CUDA device, and its
plain-PyTorch reference otherwise. Tests call the `*_triton` entry points directly; on a machine
without a GPU they run under Triton's own interpreter (TRITON_INTERPRET=1, set by the tests
before the kernel modules are imported).
"""

from __future__ import annotations

import functools
from typing import Any

import torch

try:  # triton is in the `gpu` / `dev` extras; the CPU install runs the references only
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on installs without triton
    triton = None  # type: ignore[assignment]
    tl = None  # type: ignore[assignment]

HAS_TRITON = triton is not None

try:  # grid dependency control (triton >= 3.4): programmatic dependent launch, PDL below
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

    HAS_PDL = True
except ImportError:  # pragma: no cover - older triton: plain launches
    HAS_PDL = False

# The decode-glue kernels (moe_route, index_query, argmax, silu_mul): False sends their dispatchers to the
# torch compositions they replace, on CUDA too (bench/engine.py --glue unfused, for comparison). Read
# at every call, as `_common.GLUE_KERNELS`.
GLUE_KERNELS = True


def use_triton(x: torch.Tensor) -> bool:
    """True when the Triton kernel should serve a call whose main tensor is `x`."""
    return HAS_TRITON and x.is_cuda


def interpreting(kernel: Any) -> bool:
    """True when `kernel` (a @triton.jit function) runs under Triton's CPU interpreter.

    The interpreter mishandles bf16/fp16 operands of tl.dot (triton 3.9: it reads their bits as
    integers), so kernels take an UPCAST constexpr and feed tl.dot fp32 operands there.
    """
    return type(kernel).__name__ == "InterpretedFunction"


#: programmatic dependent launch (Hopper and later): every Triton kernel of ours launches with it on such a GPU,
#: so the GPU may start a kernel's programs while the kernel before it in the stream is still finishing; each
#: program first waits (`pdl_start`: griddepcontrol.wait) until that kernel has completed and its writes are
#: visible, then lets the next kernel launch. What it hides is the launch latency between dependent kernels
#: (~1-2 us each; a decode step at batch 1 runs ~150 kernels), also inside CUDA graphs, where stream capture
#: records it as a programmatic edge. Correctness rests on the wait coming before any memory access in every
#: kernel launched with it, which holds by construction: the wait is each kernel's first statement (a kernel
#: without the launch attribute, cuBLAS's or torch's, starts only after everything before it, as usual). False:
#: plain launches (for comparison: bench/engine.py --pdl off). Read at every call, as `_common.PDL`.
PDL = True


@functools.cache
def _has_pdl(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device)[0] >= 9


def pdl(kernel: Any, x: torch.Tensor) -> dict[str, bool]:
    """Launch options that turn programmatic dependent launch on for `kernel` running on x's device (PDL's
    comment): {"PDL": True, "launch_pdl": True} on an NVIDIA GPU of compute capability 9 or later, when PDL is
    set, triton has grid dependency control and the kernel is compiled (not interpreted); {} otherwise (the
    kernel's PDL constexpr stays False, and pdl_start compiles to nothing)."""
    if PDL and HAS_PDL and x.is_cuda and torch.version.hip is None and not interpreting(kernel) and _has_pdl(x.device):
        return {"PDL": True, "launch_pdl": True}
    return {}


def require_triton() -> None:
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed: install the `gpu` or `dev` extra, or call the *_ref function")


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def is_pow2(n: int) -> bool:
    return n > 0 and not n & (n - 1)


if HAS_TRITON:
    if HAS_PDL:

        @triton.jit
        def pdl_start(PDL: tl.constexpr):
            """A kernel's first statement: under programmatic dependent launch (PDL's comment) wait for the kernel
            before it to complete, then let the next one launch; nothing without it."""
            if PDL:
                gdc_wait()
                gdc_launch_dependents()

    else:  # pragma: no cover - triton without grid dependency control: pdl() never sets PDL

        @triton.jit
        def pdl_start(PDL: tl.constexpr):
            pass

    @triton.jit
    def _splitk_sum_kernel(
        p_ptr, y_ptr, numel, s_split, SPLITS: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr = False
    ):
        """y = sum over the split axis of the fp32 partials, splits in ascending order, cast to y's dtype."""
        pdl_start(PDL)
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        acc = tl.zeros([BLOCK], tl.float32)
        for sp in tl.static_range(SPLITS):
            acc += tl.load(p_ptr + sp * s_split + offs, mask=mask, other=0.0)
        tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=mask)

else:  # pragma: no cover - installs without triton: kernel modules import the name, nothing calls it
    pdl_start = None


def splitk_sum(part: torch.Tensor, out: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """out = part.sum(0) for fp32 partials part [S, ...] and a contiguous `out` of any float dtype: one launch,
    the splits added in ascending order (the same bits at every call)."""
    numel = out.numel()
    _splitk_sum_kernel[(triton.cdiv(numel, block),)](
        part,
        out,
        numel,
        part.stride(0),
        SPLITS=part.shape[0],
        BLOCK=block,
        num_warps=4,
        **pdl(_splitk_sum_kernel, part),
    )
    return out
