"""Loading a Hugging Face-format DeepSeek-V3.2 checkpoint directory into `DeepseekV32`.

Streams shard by shard: each tensor is read from its safetensors file, copied into the network's
preallocated parameter, and dropped, so the checkpoint is never held twice.

FP8 checkpoints (e4m3 linear weights with 128x128 `weight_scale_inv` blocks): with fp8_weights
(the default on CUDA) every quantised linear stays e4m3 + scales (model/linear.py FP8Linear, the
MoE's stacked experts), served by the block-scaled FP8 kernels; kv_b_proj alone is dequantised
(MLA's absorbed form contracts it per head, as SGLang and vLLM do). Without it (the default on a
CPU, whose reference kernels would dequantise every weight on every call) weights are dequantised
to the compute dtype when loaded; a scale stored in a later shard than its weight is waited for.
Embeddings, norms, the router, the LM head: whatever the checkpoint keeps in bf16 stays in dtype.
The memory the weights hold is logged and kept in `net.weight_bytes()`. Every
tensor is checked against the expected name/shape table (checkpoint_format.py); the first problems
are reported by name. A checkpoint without MTP weights (transformers writes none) loads with MTP
unavailable, said once in the log.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from safetensors import safe_open

from .checkpoint_format import hf_tensor_shapes, layer_of, scale_shape
from .config import ModelConfig
from .fp8 import FP8_DTYPE, dequantize_weight
from .linear import fp8_module_names
from .network import DeepseekV32
from .parallel import ParallelState
from .sharding import Reader, Sharding

log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint that does not match its config: names the tensors at fault."""


def shard_files(path: Path) -> dict[str, Path]:
    """tensor name -> shard file, from the index json when present, else from the files' headers."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        missing = sorted({f for f in weight_map.values() if not (path / f).exists()})
        if missing:
            raise CheckpointError(f"{path}: shard file(s) named in the index are missing: {', '.join(missing)}")
        return {k: path / v for k, v in weight_map.items()}
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no *.safetensors files")
    out: dict[str, Path] = {}
    for f in files:
        with safe_open(f, framework="pt") as sf:
            for k in sf.keys():
                out[k] = f
    return out


def _is_mtp_copy(name: str) -> bool:
    return name.endswith((".embed_tokens.weight", ".shared_head.head.weight"))


def _target(
    net_params: dict[str, torch.Tensor], name: str, cfg: ModelConfig, sharding: Sharding | None = None
) -> tuple[torch.Tensor, tuple] | None:
    """Map an HF tensor name onto (parameter, index into it); None for known tensors not kept (by this
    rank: routed experts of another rank under expert parallelism)."""
    if name in net_params:
        return net_params[name], ()
    layer = layer_of(name)
    if layer == cfg.mtp_layer_index and _is_mtp_copy(name):
        return None  # copies of the main embedding / LM head
    if layer is not None and ".mlp.experts." in name:
        pre = name.split(".mlp.experts.")[0] + ".mlp."
        rest = name.split(".mlp.experts.")[1]
        i = net_params[pre + "w2"].shape[2]  # this rank's intermediate size (all of it without TP)
        if rest == "gate_up_proj":
            return net_params[pre + "w13"], ()
        if rest == "down_proj":
            return net_params[pre + "w2"], ()
        e_str, proj = rest.split(".", 1)
        e: int | None = int(e_str)
        if sharding is not None:
            e = sharding.local_expert(int(e_str))
            if e is None:
                return None
        if proj == "gate_proj.weight":
            return net_params[pre + "w13"], (e, slice(0, i))
        if proj == "up_proj.weight":
            return net_params[pre + "w13"], (e, slice(i, 2 * i))
        if proj == "down_proj.weight":
            return net_params[pre + "w2"], (e,)
        ib = -(-i // 128)  # FP8 experts: gate's scale blocks, then up's (model.moe.MoE.to_fp8)
        if proj == "gate_proj.weight_scale_inv":
            return net_params[pre + "w13_scale_inv"], (e, slice(0, ib))
        if proj == "up_proj.weight_scale_inv":
            return net_params[pre + "w13_scale_inv"], (e, slice(ib, 2 * ib))
        if proj == "down_proj.weight_scale_inv":
            return net_params[pre + "w2_scale_inv"], (e,)
    raise KeyError(name)


def load(
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    *,
    indexer_fp8: bool = False,
    mtp: bool = True,
    progress: bool | None = None,
    fp8_weights: bool | None = None,
    parallel: ParallelState | None = None,
) -> DeepseekV32:
    """Build the network from a checkpoint directory.

    Args:
        path: directory with config.json and model*.safetensors (+ model.safetensors.index.json).
        device, dtype: where and in which dtype the weights live (the compute dtype).
        fp8_weights: keep an FP8 checkpoint's quantised linears in e4m3 + 128x128 scales (True) or
            dequantise them to dtype (False). None: keep them on CUDA, dequantise elsewhere (the CPU
            runs the kernels' references, which would dequantise on every call). No effect on a
            checkpoint without FP8 tensors.
        indexer_fp8: run the lightning indexer on its FP8 path (DeepSeek's) instead of the exact one.
        mtp: load the MTP layer when the checkpoint has one.
        progress: log a line per shard (default: when the checkpoint is over 1 GB).
        parallel: this process's rank in a tensor-parallel worker (model/parallel.py): the network is
            its shard and only its slices are read (model/sharding.py). None: the whole network.
    Raises:
        CheckpointError naming missing, unexpected or mis-shaped tensors; ShardError when a dimension
        does not split across the ranks (or, for FP8 weights kept in e4m3, not on 128-blocks).
    """
    path = Path(path)
    cfg = ModelConfig.from_json(path)
    files = shard_files(path)
    names = set(files)
    fused = any(n.endswith("mlp.experts.gate_up_proj") for n in names)
    mtp_prefix = f"model.layers.{cfg.mtp_layer_index}."
    has_mtp = cfg.num_nextn_predict_layers > 0 and any(n.startswith(mtp_prefix) for n in names)
    if cfg.num_nextn_predict_layers and not has_mtp:
        log.warning(
            "%s: no MTP weights (model.layers.%d.*): MTP speculative decoding is unavailable", path, cfg.mtp_layer_index
        )
    use_mtp = mtp and has_mtp
    expected = hf_tensor_shapes(cfg, mtp=has_mtp, fused_experts=fused)
    if not use_mtp:
        names = {n for n in names if not n.startswith(mtp_prefix)}
        expected = {k: v for k, v in expected.items() if not k.startswith(mtp_prefix)}

    scale_names = {n for n in names if n.endswith("_scale_inv")}
    tensor_names = names - scale_names
    unexpected = sorted(tensor_names - expected.keys())
    # the MTP layer's copies of the embedding and the LM head are never used (the main ones are):
    # a checkpoint may leave them out
    copies = {k for k in expected if layer_of(k) == cfg.mtp_layer_index and _is_mtp_copy(k)}
    missing = sorted(expected.keys() - tensor_names - copies)
    orphan_scales = sorted(s for s in scale_names if s[: -len("_scale_inv")] not in names)
    problems = []
    if missing:
        problems.append(
            f"missing tensor(s): {', '.join(missing[:10])}"
            + (f" (+{len(missing) - 10} more)" if len(missing) > 10 else "")
        )
    if unexpected:
        problems.append(
            f"unexpected tensor(s): {', '.join(unexpected[:10])}"
            + (f" (+{len(unexpected) - 10} more)" if len(unexpected) > 10 else "")
        )
    if orphan_scales:
        problems.append(f"scale(s) without a weight: {', '.join(orphan_scales[:10])}")
    if problems:
        raise CheckpointError(f"{path}: checkpoint does not match config.json: " + "; ".join(problems))

    if fp8_weights is None:
        fp8_weights = torch.device(device).type == "cuda"
    if fp8_weights and scale_names and tuple(cfg.weight_block_size or (128, 128)) != (128, 128):
        log.warning(
            "%s: FP8 weight blocks %s are not 128x128: the FP8 kernels take 128x128, dequantising",
            path,
            cfg.weight_block_size,
        )
        fp8_weights = False
    keep_modules = fp8_module_names({n[: -len("_scale_inv")] for n in scale_names}) if fp8_weights else set()
    parallel = parallel or ParallelState.single()
    sharding = Sharding(cfg, parallel)
    with torch.device("meta"):
        net = DeepseekV32(cfg, with_mtp=use_mtp, indexer_fp8=indexer_fp8, parallel=parallel)
        net.to(dtype)
        net.to_fp8(keep_modules)
    net.to_empty(device=device)
    # the router (weight, correction bias) and the indexer's head weights stay fp32
    for name, mod in net.named_modules():
        if hasattr(mod, "e_score_correction_bias"):
            mod.e_score_correction_bias.data = mod.e_score_correction_bias.data.float()
            mod.weight.data = mod.weight.data.float()
        if name.endswith("indexer.weights_proj"):
            mod.float()
    net.rotary.inv_freq = net.rotary.inv_freq.to(device)
    params: dict[str, torch.Tensor] = dict(net.named_parameters())
    params.update(dict(net.named_buffers()))
    # FP8 tensors (and their scales) copied as they are: those whose target parameter is e4m3
    kept = {
        n
        for n in names - scale_names
        if n + "_scale_inv" in names
        and n in expected
        and (tgt := _target(params, n, cfg, sharding)) is not None
        and tgt[0].dtype == FP8_DTYPE
    }
    block = cfg.weight_block_size or (128, 128)
    for n in sorted(kept):  # before reading anything: every kept FP8 weight splits on whole blocks
        sharding.scale_index(n, expected[n], block)

    by_file: dict[Path, list[str]] = {}
    for n in sorted(names):
        by_file.setdefault(files[n], []).append(n)
    total_bytes = sum(f.stat().st_size for f in by_file)
    show = progress if progress is not None else total_bytes > 1 << 30
    pending_fp8: dict[str, torch.Tensor] = {}  # fp8 weights waiting for their scale
    pending_scale: dict[str, torch.Tensor] = {}  # scales waiting for their weight
    t0, done_bytes = time.monotonic(), 0

    def place(name: str, value: torch.Tensor) -> None:
        tgt = _target(params, name, cfg, sharding)
        if tgt is None:
            return
        param, idx = tgt
        dst = param[idx] if idx else param
        if tuple(value.shape) != tuple(dst.shape):
            raise CheckpointError(f"{path}: tensor {name} has shape {tuple(value.shape)}, expected {tuple(dst.shape)}")
        dst.copy_(value.to(dst.dtype))

    with torch.no_grad():
        for i, (f, keys) in enumerate(by_file.items()):
            with safe_open(f, framework="pt", device="cpu") as sf:

                def reader(n: str) -> Reader:
                    return lambda idx: sf.get_slice(n)[idx] if idx else sf.get_tensor(n)

                for name in keys:
                    if name in scale_names:
                        wname = name[: -len("_scale_inv")]
                        if _target(params, wname, cfg, sharding) is None:
                            continue  # not kept here (an expert of another rank, an MTP copy)
                        wshape = expected[wname]
                        if wname in kept:
                            sc = sharding.read_scale(wname, wshape, reader(name), block)
                            assert sc is not None  # the weight is this rank's
                            place(name, sc.float())
                        elif wname in pending_fp8:
                            full = _dequant(path, wname, pending_fp8.pop(wname), sf.get_tensor(name), block, dtype)
                            place(wname, _shard_of(sharding, wname, full))
                        else:
                            pending_scale[wname] = sf.get_tensor(name)
                        continue
                    shape = tuple(sf.get_slice(name).get_shape())
                    if shape != expected[name]:
                        raise CheckpointError(f"{path}: tensor {name} has shape {shape}, expected {expected[name]}")
                    if _target(params, name, cfg, sharding) is None:
                        continue
                    if name in kept:  # stays e4m3: this rank's slice placed as is
                        t = sharding.read(name, shape, reader(name))
                        assert t is not None
                        place(name, t)
                        continue
                    if name + "_scale_inv" not in names:  # not quantised: read this rank's slice only
                        t = sharding.read(name, shape, reader(name))
                        assert t is not None
                        if t.dtype == FP8_DTYPE:
                            raise CheckpointError(f"{path}: FP8 tensor {name} has no {name}_scale_inv")
                        place(name, t)
                        continue
                    t = sf.get_tensor(name)  # dequantised at load: whole blocks first, then this rank's slice
                    if t.dtype != FP8_DTYPE:
                        place(name, _shard_of(sharding, name, t))
                    elif name + "_scale_inv" in pending_scale:
                        full = _dequant(path, name, t, pending_scale.pop(name + "_scale_inv"), block, dtype)
                        place(name, _shard_of(sharding, name, full))
                    else:
                        pending_fp8[name] = t
            done_bytes += f.stat().st_size
            if show:
                el = time.monotonic() - t0
                log.info(
                    "loading %s: shard %d/%d, %.1f/%.1f GB, %.0f s",
                    path.name,
                    i + 1,
                    len(by_file),
                    done_bytes / 1e9,
                    total_bytes / 1e9,
                    el,
                )
    if pending_fp8:
        raise CheckpointError(f"{path}: FP8 tensor(s) without scale: {', '.join(sorted(pending_fp8)[:10])}")
    net.eval()
    wb = net.weight_bytes()
    log.info(
        "%s: weights hold %.3f GiB on %s (e4m3 %.3f GiB + block scales %.1f MiB, other %.3f GiB in %s)%s",
        path.name,
        wb["total"] / 2**30,
        device,
        wb["fp8"] / 2**30,
        wb["scales"] / 2**20,
        wb["other"] / 2**30,
        str(dtype).replace("torch.", ""),
        "" if wb["fp8"] or not scale_names else "; FP8 weights dequantised",
    )
    return net


def _shard_of(sharding: Sharding, name: str, full: torch.Tensor) -> torch.Tensor:
    t = sharding.read(name, tuple(full.shape), lambda idx: full[idx] if idx else full)
    assert t is not None  # callers check the tensor is this rank's
    return t


def _dequant(
    path: Path, name: str, w: torch.Tensor, scale: torch.Tensor, block: tuple[int, int], dtype: torch.dtype
) -> torch.Tensor:
    expect = scale_shape(tuple(w.shape), block)
    if tuple(scale.shape) != expect:
        raise CheckpointError(f"{path}: tensor {name}_scale_inv has shape {tuple(scale.shape)}, expected {expect}")
    return dequantize_weight(w, scale, block, dtype)
