"""Radix-select top-k (kernels/radix_topk.py) against torch.topk (topk_ref) and against `order_ref`, the
module docstring's exact output (above the k-th largest ascending, then ties lowest first, -1 padding),
for each of the three Triton variants (stream, reg, split; the split one at small chunk widths so a
row spans many programs)."""

from __future__ import annotations

import pytest
import torch

from splitserve.kernels import radix_topk as T

pytest.importorskip("triton")
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
NEG = float("-inf")


def assert_valid_topk(got: torch.Tensor, logits: torch.Tensor, k: int) -> None:
    """Each row: min(k, visible) distinct visible positions, none scoring below any unselected
    visible one, the rest -1; with ties at the k-th value the lowest positions are taken."""
    for b in range(logits.shape[0]):
        row, x = got[b].long(), logits[b]
        vis = x > NEG
        n = min(k, int(vis.sum()))
        sel = row[row >= 0]
        assert sel.numel() == n and int((row < 0).sum()) == k - n
        assert sel.unique().numel() == n and bool(vis[sel].all())
        if n == 0:
            continue
        kth = x[sel].min()
        unsel = torch.ones_like(vis)
        unsel[sel] = False
        assert not bool((x[unsel & vis] > kth).any())
        ties = (x == kth).nonzero().flatten()
        taken = ties[torch.isin(ties, sel)]
        assert torch.equal(taken, ties[: taken.numel()])  # lowest positions first


def sort_keys(x: torch.Tensor) -> torch.Tensor:
    """The kernels' order-preserving fp32 -> uint32 map, as int64 (-0.0 just below +0.0)."""
    u = x.contiguous().view(torch.int32).long() & 0xFFFFFFFF
    return torch.where(u >> 31 != 0, u ^ 0xFFFFFFFF, u ^ 0x80000000)


def order_ref(x: torch.Tensor, k: int) -> torch.Tensor:
    """The documented output, written plainly: per row, if at most k visible, all of them ascending; else
    the positions whose key is above the k-th largest key ascending, then the lowest tied positions."""
    x = x.cpu()
    out = torch.full((x.shape[0], k), -1, dtype=torch.int32)
    for b in range(x.shape[0]):
        pos = (x[b] > NEG).nonzero().flatten()  # NaN is not > -inf: not visible
        if pos.numel() <= k:
            out[b, : pos.numel()] = pos.int()
            continue
        key = sort_keys(x[b])[pos]
        thr = key.sort(descending=True).values[k - 1]
        above = pos[key > thr]
        out[b] = torch.cat([above, pos[key == thr][: k - above.numel()]]).int()
    return out


#: each Triton variant at small blocks: several stream iterations, many split chunks
VARIANTS = {
    "stream": lambda x, k: T.topk_triton(x, k, block=128),
    "reg": T.topk_triton_reg,
    "reg8": lambda x, k: T.topk_triton_reg(x, k, bits=8),
    "reg5": lambda x, k: T.topk_triton_reg(x, k, bits=5),
    "reg6": lambda x, k: T.topk_triton_reg(x, k, bits=6),
    "split32": lambda x, k: T.topk_triton_split(x, k, block=32),
    "split64": lambda x, k: T.topk_triton_split(x, k, block=64),
}


def rows_case(device: str, bsz: int, width: int, visible: list[int]) -> torch.Tensor:
    x = torch.randn(bsz, width, device=device)
    for b, v in enumerate(visible):
        x[b, v:] = NEG
    return x


@pytest.mark.parametrize("width,k", [(100, 16), (37, 64), (300, 7), (2500, 1024)])
def test_topk_set_equals_torch(width, k, device):
    vis = [width, width // 2, 3, 0]
    x = rows_case(device, 4, width, vis)
    got = T.topk_triton(x, k, block=256)
    ref = T.topk_ref(x, k)
    assert got.dtype == torch.int32 and got.shape == (4, k)
    for b in range(4):  # distinct values: the same set as torch.topk
        assert set(got[b].tolist()) == set(ref[b].tolist())
    assert_valid_topk(got.cpu(), x.cpu(), k)
    assert (got[3] == -1).all()


def test_topk_ties_and_signs(device):
    """Few distinct values (many ties at the threshold), negatives, zeros of both signs, +inf."""
    x = torch.randint(-3, 4, (3, 700), device=device).float()
    x[1, ::7] = -0.0
    x[1, 5] = float("inf")
    x[2, :350] = NEG
    got = T.topk_triton(x, 100, block=128)
    assert_valid_topk(got.cpu(), x.cpu(), 100)
    assert 5 in got[1].tolist()


def test_topk_high_bits_equal(device):
    """Scores that share their high 24 bits (one bucket until the last byte)."""
    base = torch.tensor(1.5, device=device).view(torch.int32)
    bits = base + torch.randperm(256, device=device, dtype=torch.int32)[None, :].repeat(2, 4)[:, :1000]
    x = bits.view(torch.float32).contiguous()
    got = T.topk_triton(x, 300, block=256)
    assert_valid_topk(got.cpu(), x.cpu(), 300)


def test_dispatch_uses_reference_on_cpu():
    x = rows_case("cpu", 2, 50, [50, 10])
    assert torch.equal(T.topk(x, 20), T.topk_ref(x, 20))


@gpu
@pytest.mark.parametrize("bsz,width", [(1, 4160), (64, 4160), (4, 131072)])
def test_topk_gpu_real_shapes(bsz, width):
    x = rows_case("cuda", bsz, width, [width - 13 * b for b in range(bsz)])
    got = T.topk_triton(x, 2048)
    ref = T.topk_ref(x, 2048)
    for b in range(bsz):
        assert set(got[b].tolist()) == set(ref[b].tolist())


def test_topk_nan_counts_as_not_visible(device):
    """The kernel never selects a NaN score (the module docstring's rule): a row with NaNs selects among
    its other visible scores, an all-NaN row selects nothing."""
    nan = float("nan")
    x = torch.tensor([[1.0, nan, 3.0, NEG, 2.0, 0.5], [nan] * 6], device=device)
    got = T.topk_triton(x, 2, block=8).cpu()
    assert sorted(got[0].tolist()) == [2, 4]
    assert got[1].tolist() == [-1, -1]


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("width,k", [(100, 16), (37, 64), (300, 7), (1000, 16), (64, 16), (17, 16)])
def test_variants_exact_order(variant, width, k, device):
    """Distinct scores, rows with all / half / 3 / none / k-1 / k / k+1 visible: the documented output
    bit for bit, and the same set as torch.topk."""
    vis = [width, width // 2, 3, 0, min(width, k - 1), min(width, k), min(width, k + 1)]
    x = rows_case(device, len(vis), width, vis)
    got = VARIANTS[variant](x, k)
    assert got.dtype == torch.int32 and got.shape == (len(vis), k)
    assert torch.equal(got.cpu(), order_ref(x, k))
    ref = T.topk_ref(x, k)
    for b in range(len(vis)):
        assert set(got[b].tolist()) == set(ref[b].tolist())


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variants_ties_signs_nan(variant, device):
    """Few distinct values (ties at the threshold across chunk borders), both zeros, +inf, NaN, a short row."""
    x = torch.randint(-3, 4, (4, 700), device=device).float()
    x[1, ::7] = -0.0
    x[1, 5] = float("inf")
    x[2, :350] = NEG
    x[3, ::3] = float("nan")
    got = VARIANTS[variant](x, 100)
    assert torch.equal(got.cpu(), order_ref(x, 100))
    assert_valid_topk(got.cpu(), x.cpu(), 100)
    assert 5 in got[1].tolist()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variants_low_byte_decides(variant, device):
    """Scores sharing their high 24 bits (one bucket until the last byte), all equal rows, non-contiguous rows."""
    base = torch.tensor(-1.5, device=device).view(torch.int32)
    bits = base + torch.randperm(256, device=device, dtype=torch.int32)[None, :].repeat(2, 4)[:, :1000]
    x = bits.view(torch.float32)
    x = torch.cat([x, torch.full((1, 1000), 2.5, device=device)])
    x = torch.cat([x, x], dim=1)[:, ::2]  # stride 2 on the last dim: the wrappers make it contiguous
    got = VARIANTS[variant](x, 300)
    assert torch.equal(got.cpu(), order_ref(x, 300))
    assert got[2].tolist() == list(range(300))  # all tied: the lowest positions


def test_split_block_and_choice():
    assert T.split_block(1, 4096) == 1024 and T.split_block(256, 65536) == 8192
    assert T.choose_kernel(1, T.REG_MAX_WIDTH + 1, min_rows=1) == "split"
    assert T.choose_kernel(T.SPLIT_MAX_ROWS + 1, T.REG_MAX_WIDTH + 1, min_rows=1) == "stream"
    assert T.choose_kernel(3, 4096, min_rows=4) == "torch"
    assert T.choose_kernel(1, 4096, min_rows=1, reg_max_width=4096) == "reg"
    # what the engine gets with the defaults: the split kernel up to 32 rows, the stream kernel beyond, the reg
    # kernel off (radix_topk.REG_MAX_WIDTH says why), torch.topk never (MIN_ROWS 1)
    assert (T.MIN_ROWS, T.REG_MAX_WIDTH, T.SPLIT_MAX_ROWS) == (1, 0, 32)
    for width in (300, 4096, 65536):
        assert T.choose_kernel(1, width) == T.choose_kernel(32, width) == "split"
        assert T.choose_kernel(33, width) == T.choose_kernel(1024, width) == "stream"
    with pytest.raises(ValueError):
        T.topk_triton_reg(torch.zeros(1, T.REG_WIDTH_LIMIT + 1), 8)


@gpu
@pytest.mark.parametrize("variant", ["stream", "reg", "split"])
@pytest.mark.parametrize("bsz,width", [(1, 4160), (3, 16384), (2, 65536), (64, 4160)])
def test_variants_gpu_real_shapes(variant, bsz, width):
    if variant == "reg" and width > T.REG_WIDTH_LIMIT:
        pytest.skip("wider than the reg kernel takes")
    x = rows_case("cuda", bsz, width, [width - 13 * b for b in range(bsz)])
    got = T.VARIANTS[variant](x, 2048)
    assert torch.equal(got.cpu(), order_ref(x, 2048))


@gpu
@pytest.mark.parametrize("variant", ["reg", "split"])
def test_variants_cuda_graph_replay(variant):
    """Captured once, replayed on new scores in the same buffer: the same output as an eager call."""
    x = torch.randn(4, 8192, device="cuda")
    fn = T.VARIANTS[variant]
    fn(x, 2048)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fn(x, 2048)
    x.copy_(torch.randn_like(x))
    x[1, 5000:] = NEG
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, fn(x, 2048))


@gpu
@pytest.mark.parametrize("warps", [4, 8, 16])
def test_reg_kernel_on_the_engine_call_it_once_failed(warps):
    """The indexer call (142 rows x 304 scores, k 128) on which the reg kernel with 6-bit digits at 4 warps left
    tie slots unwritten (bench/results/topk-diag-h100): the default digits give the documented output."""
    from pathlib import Path

    saved = Path(__file__).parents[2] / "bench/results/topk-diag-h100/engine_first_bad.pt"
    d = torch.load(saved)
    x, k = d["logits"].cuda().float(), d["k"]
    assert tuple(x.shape) == (142, 304) and k == 128
    got = T.topk_triton_reg(x, k, num_warps=warps)
    assert torch.equal(got.cpu(), order_ref(x.cpu(), k))


def test_bench_cell_and_min_rows_rule(device):
    """bench/topk.py at a small cell (its check passes, every implementation timed, choose_kernel's pick
    among them), and its MIN_ROWS suggestion: the smallest row count from which the pick beats torch at
    every width."""
    from splitserve.bench import topk as B

    cell = B.run_cell(2, 300, 16, calls=2, device=device)
    assert {"torch", "stream", "reg", "split"} <= set(cell["times"]) and cell["pick"] in cell["times"]
    assert cell["fastest_triton"] != "torch"

    def c(rows, ratio):
        return {"rows": rows, "pick_over_torch_warm": ratio}

    assert B.suggest_min_rows([c(1, 1.2), c(4, 0.9), c(4, 0.8), c(16, 0.5)]) == 4
    assert B.suggest_min_rows([c(1, 0.5), c(4, None), c(16, 0.5)]) == 16
    assert B.suggest_min_rows([c(1, 0.9), c(4, 1.1), c(16, 0.5)]) == 16
    assert B.suggest_min_rows([c(1, 0.9), c(16, 1.5)]) is None


@pytest.mark.parametrize("width,k", [(700, 100), (50, 64), (64, 64), (300, 7)])
def test_bench_exact_ref_is_order_ref(width, k):
    """bench/topk.py's whole-tensor reference (what it checks the GPU outputs against) equals order_ref on
    ties, both zeros, +inf, NaN and short rows."""
    from splitserve.bench import topk as B

    x = torch.randint(-3, 4, (5, width)).float()
    x[1, ::7] = -0.0
    x[1, 5] = float("inf")
    x[2, : width // 2] = NEG
    x[3, ::3] = float("nan")
    x[4] = torch.randn(width)
    x[4, k // 2 :] = NEG
    assert torch.equal(B.exact_ref(x, k), order_ref(x, k))
