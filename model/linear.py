"""Linear layers whose weights stay in the checkpoint's FP8, and the fusion of several linears into one GEMM.

`FP8Linear` holds `weight` [out, in] float8_e4m3fn and `weight_scale_inv` [ceil(out/128), ceil(in/128)]
fp32 — the checkpoint's own names, so the loader copies both tensors straight in — and runs
kernels.fp8_linear (block-scaled Triton GEMM on CUDA, its PyTorch reference elsewhere).

`FusedLinear` concatenates linears that read the same input (MLA's q_a | kv_a | indexer wk, an
MLP's gate | up) into one weight; the modules' weights become views of it (no extra memory). FP8
parts are padded to whole 128-row blocks first (kv_a's 576 rows become 640), so every part keeps
its own scale blocks; the padding rows are zero and their outputs are dropped.

Which weights are FP8: `fp8_module_names()` maps a checkpoint's FP8 tensor names onto modules.
kv_b_proj is the exception everywhere: MLA's absorbed form (decode) splits it per head into W_uk
and W_uv and contracts it in einsums, so it is dequantised at load, as SGLang and vLLM do.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from splitserve.kernels import fp8_linear

from .fp8 import FP8_DTYPE, quantize_weight

BLOCK = 128


class FP8Linear(nn.Module):
    """y = x @ W^T, W = weight (e4m3) * weight_scale_inv per 128x128 block; activations quantised per
    1x128 group inside the GEMM (DeepSeek's act_quant, ue8m0)."""

    def __init__(self, in_features: int, out_features: int, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(
            torch.empty(out_features, in_features, dtype=FP8_DTYPE, device=device), requires_grad=False
        )
        self.weight_scale_inv = nn.Parameter(
            torch.empty(
                math.ceil(out_features / BLOCK), math.ceil(in_features / BLOCK), dtype=torch.float32, device=device
            ),
            requires_grad=False,
        )

    @classmethod
    def from_linear(cls, lin: nn.Linear, quantize: bool = False) -> FP8Linear:
        """An FP8 twin of `lin` (same device): empty, or with lin's weight quantised per 128x128 block."""
        out = cls(lin.in_features, lin.out_features, lin.weight.device)
        if quantize:
            q, s = quantize_weight(lin.weight.detach())
            out.weight.data.copy_(q)
            out.weight_scale_inv.data.copy_(s)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x, self.weight, self.weight_scale_inv)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, e4m3 128x128 blocks"


def is_fp8(mod: nn.Module) -> bool:
    return isinstance(mod, FP8Linear)


class FusedLinear:
    """One GEMM for several bias-free linears of the same input (all nn.Linear, or all FP8Linear).

    Built in place: each module's weight (and scale) becomes a view of the fused tensor, so memory
    does not grow and the parameters keep their names and shapes. `__call__(x)` returns one output
    per module."""

    def __init__(self, mods: Sequence[nn.Linear | FP8Linear]) -> None:
        kinds = {is_fp8(m) for m in mods}
        if len(kinds) != 1:
            raise ValueError("FusedLinear needs linears of one kind (all FP8 or none)")
        self.fp8 = kinds.pop()
        self.rows: list[int] = [m.weight.shape[0] for m in mods]
        self.scale: torch.Tensor | None = None
        with torch.no_grad():
            if not self.fp8:
                self.padded = list(self.rows)
                self.weight = torch.cat([m.weight for m in mods])
            else:
                fp8s = [m for m in mods if isinstance(m, FP8Linear)]  # all of them (one kind)
                self.padded = [-(-r // BLOCK) * BLOCK for r in self.rows[:-1]] + self.rows[-1:]
                parts: list[torch.Tensor] = []
                for f, r, p in zip(fp8s, self.rows, self.padded):
                    parts.append(f.weight)
                    if p > r:
                        parts.append(
                            torch.zeros(p - r, f.weight.shape[1], dtype=f.weight.dtype, device=f.weight.device)
                        )
                self.weight = torch.cat(parts)
                self.scale = torch.cat([f.weight_scale_inv for f in fp8s])
                sstart = 0
                for f in fp8s:
                    sr = f.weight_scale_inv.shape[0]
                    f.weight_scale_inv.data = self.scale[sstart : sstart + sr]
                    sstart += sr
            start = 0
            for m, r, p in zip(mods, self.rows, self.padded):
                m.weight.data = self.weight[start : start + r]
                start += p

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.scale is not None:  # FP8
            y = fp8_linear(x, self.weight, self.scale)
        else:
            y = F.linear(x, self.weight)
        outs = y.split(self.padded, dim=-1)
        return [o[..., :r] if r != p else o for o, r, p in zip(outs, self.rows, self.padded)]


def fp8_module_names(fp8_tensors: set[str]) -> set[str]:
    """Checkpoint names of FP8 weights -> module paths to hold in FP8: linears by their path, routed
    experts by their MoE module (`...mlp`); kv_b_proj and transformers' fused expert tensors stay out
    (dequantised at load)."""
    out: set[str] = set()
    for name in fp8_tensors:
        if not name.endswith(".weight") or name.endswith("kv_b_proj.weight"):
            continue
        path = name[: -len(".weight")]
        if ".mlp.experts." in path:
            out.add(path.split(".mlp.experts.")[0] + ".mlp")
        else:
            out.add(path)
    return out
