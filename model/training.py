"""Training of the small DeepSeek-V3.2-architecture model "pycoder" on the CPython standard library.

One module owns the whole recipe: the corpus (the standard library's .py files, a deterministic
held-out split by a hash of each file's relative path), the byte-level BPE tokenizer trained on it,
the model's shape (`pycoder_config`), a differentiable full-sequence forward over the inference
network's own parameters (`TrainForward`), the training loop and the evaluation.

Training follows DeepSeek's recipe for the parts the architecture has:
- next-token cross-entropy plus the MTP loss (weight `--mtp-weight`, 0.3 by default, as V3's first
  phase): the MTP module reads the main model's normed hidden state at position i and the token at
  i + 1 and predicts the token at i + 2;
- MoE routing with the auxiliary-loss-free balance of V3: after every step each routed expert's
  score-correction bias moves by `--bias-rate` towards equal load (overloaded experts down);
- the lightning indexer (V3.2): the main model first trains densely (phase "dense"; the indexer is
  idle), then the indexer alone is warmed up ("warmup": every other parameter frozen, dense attention)
  to match the main attention's distribution: KL(p || softmax(I)), p the sum over heads of the main
  attention probabilities, L1-normalised per query; then "sparse": the main attention sees only the
  indexer's top-k keys per query and the indexer keeps learning by the same KL restricted to the
  selected keys, its inputs detached from the main graph (the LM loss never reaches it, and the KL
  never reaches the main model).

The forward here is the inference network's math (model/attention.py, moe.py, network.py) written
over whole [batch, seq] tensors with the kernels' PyTorch references, so that autograd runs through
it; tests/model/test_training.py checks that the engine's logits on a written checkpoint equal these.

    PYTHONPATH=.. python3 -m splitserve.model.training train --out DIR --time-budget-s 480
    splitserve train --out DIR ...       (the same, installed)

Imports nothing beyond torch, safetensors and tokenizers (no ray/grpc/fastapi), so it runs on a bare
GPU machine.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import random
import shutil
import sys
import sysconfig
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from splitserve.kernels.norm import rms_norm_ref
from splitserve.kernels.rotary import rope_ref

from .attention import MLA, Indexer
from .checkpoint_format import hf_tensor_shapes, layer_of
from .config import ModelConfig, RopeConfig
from .moe import Gate, MoE
from .network import DecoderLayer, DeepseekV32, MTPLayer
from .norm import RMSNorm

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------------
# corpus

#: Directory names under the standard library whose files are not used (installed packages, data
#: modules that are one big literal, the codec tables of encodings/).
SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__", "pydoc_data", "encodings"})
#: The library's own test suites (`--with-tests`: 3/4 of the code where the Python install has them; the
#: shipped model's GPU machine had none). Never tokenizer data.
TEST_DIRS = frozenset({"test", "tests", "idle_test"})
HELDOUT_PERCENT = 5  # the evaluation split (held out from everything, tokenizer included)
VALID_PERCENT = 3  # the validation split (watched during training for over-fitting)
SPLITS = ("train", "valid", "heldout")


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def split_of(rel: str) -> str:
    """The split of the file at relative path `rel` (posix form), from a hash of the path: deterministic."""
    bucket = int(hashlib.sha256(rel.encode()).hexdigest()[:8], 16) % 100
    if bucket < HELDOUT_PERCENT:
        return "heldout"
    return "valid" if bucket < HELDOUT_PERCENT + VALID_PERCENT else "train"


def corpus_files(split: str, root: Path | None = None, tests: bool = False) -> list[tuple[str, Path]]:
    """(relative path, path) of the standard library's .py files of `split` (SPLITS), sorted; `tests`:
    with the files under the test suites' directories (TEST_DIRS)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    root = root or stdlib_root()
    out = []
    for p in root.rglob("*.py"):
        rel = p.relative_to(root).as_posix()
        dirs = rel.split("/")[:-1]
        if SKIP_DIRS.intersection(dirs) or (not tests and TEST_DIRS.intersection(dirs)):
            continue
        if split_of(rel) == split:
            out.append((rel, p))
    if not out:
        raise FileNotFoundError(f"no .py files for split {split!r} under {root}")
    return sorted(out)


def corpus_texts(split: str, root: Path | None = None, tests: bool = False) -> list[str]:
    texts = []
    for _, p in corpus_files(split, root, tests):
        try:
            texts.append(p.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, OSError):
            continue
    return texts


def token_stream(tokenizer: Any, texts: Sequence[str]) -> torch.Tensor:
    """Every text as BOS + its tokens + EOS, concatenated: int64 [T] (batch-encoded on every core)."""
    from .tokenizer import BOS_TOKEN_ID, EOS_TOKEN_ID

    encs = tokenizer.encode_batch_fast(list(texts)) if hasattr(tokenizer, "encode_batch_fast") else None
    if encs is None:
        encs = tokenizer.encode_batch(list(texts))
    parts: list[int] = []
    for e in encs:
        parts.append(BOS_TOKEN_ID)
        parts.extend(e.ids)
        parts.append(EOS_TOKEN_ID)
    return torch.tensor(parts, dtype=torch.int64)


def train_tokenizer(vocab_size: int, out: Path, root: Path | None = None) -> None:
    """Train the byte-level BPE on the train split's modules (without the test suites) and write
    tokenizer.json + tokenizer_config.json."""
    from .tokenizer import BOS_TOKEN, EOS_TOKEN
    from .tokenizer import train_tokenizer as bpe

    tok = bpe(vocab_size, corpus_texts("train", root, tests=False))
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"), pretty=False)
    write_tokenizer_config(out, BOS_TOKEN, EOS_TOKEN)


def write_tokenizer_config(out: Path, bos: str, eos: str, max_len: int = 2048) -> None:
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "bos_token": bos,
                "eos_token": eos,
                "model_max_length": max_len,
                "tokenizer_class": "PreTrainedTokenizerFast",
                "clean_up_tokenization_spaces": False,
            },
            indent=2,
        )
        + "\n"
    )


# ---------------------------------------------------------------------------------------------------
# the model's shape


def pycoder_config(vocab_size: int = 4096) -> ModelConfig:
    """The shipped model: V3.2's parts at a size that fits 6 MiB (2.9 M parameters in bf16, tokenizer
    included) and decodes in a few ms on 2 cores.

    Hidden 192, vocabulary 4096, 2 layers (1 dense, 1 MoE: 8 routed experts of 64, 2 active, 1 shared)
    + 1 MTP layer (MoE), MLA with
    4 heads, the lightning indexer with 8 heads of 32 and top-k 128 (below the 512-token training
    context, so training and serving are sparse beyond 128 tokens).
    """
    return ModelConfig(
        vocab_size=vocab_size,
        hidden_size=192,
        intermediate_size=384,
        moe_intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        q_lora_rank=96,
        kv_lora_rank=64,
        qk_nope_head_dim=32,
        qk_rope_head_dim=16,
        v_head_dim=32,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_shared_experts=1,
        n_group=1,
        topk_group=1,
        routed_scaling_factor=1.0,
        first_k_dense_replace=1,
        index_n_heads=8,
        index_head_dim=32,
        index_topk=128,
        num_nextn_predict_layers=1,
        max_position_embeddings=2048,
        rope=RopeConfig(rope_type="default", theta=10000.0, original_max_position_embeddings=2048),
    )


def shipped_tensors(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The tensors a checkpoint of this module holds: the HF layout with fused experts, without the MTP
    layer's copies of the embedding and LM head (the loader uses the main ones)."""
    shapes = hf_tensor_shapes(cfg, mtp=True, fused_experts=True)
    return {
        k: v
        for k, v in shapes.items()
        if not (layer_of(k) == cfg.mtp_layer_index and k.endswith((".embed_tokens.weight", ".shared_head.head.weight")))
    }


def count_params(cfg: ModelConfig) -> int:
    return sum(math.prod(s) for s in shipped_tensors(cfg).values())


# ---------------------------------------------------------------------------------------------------
# the training forward


def _rms(x: torch.Tensor, norm: RMSNorm) -> torch.Tensor:
    out = rms_norm_ref(x, norm.weight, norm.eps)
    assert isinstance(out, torch.Tensor)
    return out


@dataclass
class Mode:
    """sparse: the main attention is restricted to the indexer's top-k; indexer: compute the indexer's KL."""

    sparse: bool = False
    indexer: bool = False


@dataclass
class ForwardOut:
    logits: torch.Tensor  # [B, S, V] fp32
    mtp_logits: torch.Tensor | None  # [B, S-1, V] fp32: position i predicts token i + 2
    indexer_kl: torch.Tensor  # scalar: mean over layers and queries
    expert_load: list[torch.Tensor]  # per MoE layer: [E] token counts


class TrainForward:
    """A differentiable full-sequence forward over a DeepseekV32's parameters (same names, same math).

    `__call__(ids [B, S])` computes main logits for every position and, when the network has the MTP
    layer and `next_ids` is given, the MTP logits. Attention is dense-causal or (Mode.sparse)
    restricted to the indexer's top-k per query, with the inference network's selection rule
    (attention.select_topk: a query with at most index_topk visible keys sees them all).
    """

    def __init__(self, net: DeepseekV32) -> None:
        self.net = net
        self.cfg = net.cfg

    def cos_sin(self, s: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return self.net.rotary.cos_sin(torch.arange(s, device=device), dtype)

    def __call__(self, ids: torch.Tensor, mode: Mode, next_ids: torch.Tensor | None = None) -> ForwardOut:
        net, cfg = self.net, self.cfg
        b, s = ids.shape
        dtype = net.dtype
        cos, sin = self.cos_sin(s, ids.device, dtype)
        x = net.model.embed_tokens(ids)
        kls: list[torch.Tensor] = []
        loads: list[torch.Tensor] = []
        for layer in net.model.layers[: cfg.num_hidden_layers]:
            assert isinstance(layer, DecoderLayer)
            x = self._layer(layer, x, cos, sin, mode, kls, loads)
        h = _rms(x, net.model.norm)
        logits = net.lm_head(h).float()
        mtp_logits = None
        if next_ids is not None and net.has_mtp:
            mtp: MTPLayer = net.mtp
            n = next_ids.shape[1]
            e = _rms(net.model.embed_tokens(next_ids), mtp.enorm)
            y = mtp.eh_proj(torch.cat([e, _rms(h[:, :n], mtp.hnorm)], dim=-1))
            y = self._layer(mtp, y, cos[:n], sin[:n], mode, kls, loads)
            mtp_logits = net.lm_head(_rms(y, mtp.shared_head.norm)).float()
        kl = torch.stack(kls).mean() if kls else logits.new_zeros(())
        return ForwardOut(logits, mtp_logits, kl, loads)

    def _layer(
        self,
        layer: DecoderLayer,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mode: Mode,
        kls: list[torch.Tensor],
        loads: list[torch.Tensor],
    ) -> torch.Tensor:
        x = x + self._attention(layer.self_attn, _rms(x, layer.input_layernorm), cos, sin, mode, kls)
        y = _rms(x, layer.post_attention_layernorm)
        if isinstance(layer.mlp, MoE):
            out, load = self._moe(layer.mlp, y)
            loads.append(load)
        else:
            out = layer.mlp(y)
        return x + out

    def _attention(
        self,
        attn: MLA,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mode: Mode,
        kls: list[torch.Tensor],
    ) -> torch.Tensor:
        cfg = self.cfg
        b, s, d = x.shape
        h = cfg.num_attention_heads
        n = b * s
        cn, sn = cos.repeat(b, 1), sin.repeat(b, 1)  # [n, r/2]: per flattened token
        xf = x.reshape(n, d)
        q_resid = _rms(attn.q_a_proj(xf), attn.q_a_layernorm)
        q = attn.q_b_proj(q_resid).view(n, h, cfg.qk_head_dim)
        q_nope, q_rope = q.split([cfg.qk_nope_head_dim, cfg.qk_rope_head_dim], dim=-1)
        q_rope = rope_ref(q_rope, cn, sn, True)
        latent, k_rope = attn.kv_a_proj_with_mqa(xf).split([cfg.kv_lora_rank, cfg.qk_rope_head_dim], dim=-1)
        lat = _rms(latent, attn.kv_a_layernorm)
        k_rope = rope_ref(k_rope, cn, sn, True)
        kv = attn.kv_b_proj(lat).view(b, s, h, cfg.qk_nope_head_dim + cfg.v_head_dim)
        k_nope, v = kv.split([cfg.qk_nope_head_dim, cfg.v_head_dim], dim=-1)
        logits = torch.einsum("bshd,bthd->bhst", q_nope.reshape(b, s, h, -1), k_nope) + torch.einsum(
            "bshd,btd->bhst", q_rope.reshape(b, s, h, -1), k_rope.reshape(b, s, -1)
        )
        causal = torch.ones(s, s, dtype=torch.bool, device=x.device).tril()
        allowed = causal[None].expand(b, s, s)
        index_logp = None
        if mode.sparse or mode.indexer:
            scores = self._index_scores(attn.indexer, xf.detach(), q_resid.detach(), cn, sn, b, s)
            if mode.sparse and s > cfg.index_topk:
                masked = scores.masked_fill(~causal, float("-inf"))
                idx = masked.topk(cfg.index_topk, dim=-1).indices
                allowed = torch.zeros(b, s, s, dtype=torch.bool, device=x.device).scatter_(2, idx, True) & causal
            if mode.indexer:
                index_logp = torch.log_softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
        logits = logits.float() * cfg.softmax_scale
        p = torch.softmax(logits.masked_fill(~allowed[:, None], float("-inf")), dim=-1)
        if index_logp is not None:
            target = p.detach().sum(1)
            target = target / target.sum(-1, keepdim=True)
            # KL(target || indexer) over the allowed keys (target is 0 elsewhere)
            kl = (torch.xlogy(target, target) - target * index_logp.masked_fill(~allowed, 0.0)).sum(-1)
            kls.append(kl.mean())
        out = torch.einsum("bhst,bthd->bshd", p.to(v.dtype), v)
        return attn.o_proj(out.reshape(b, s, h * cfg.v_head_dim))

    def _index_scores(
        self,
        ix: Indexer,
        xf: torch.Tensor,
        q_resid: torch.Tensor,
        cn: torch.Tensor,
        sn: torch.Tensor,
        b: int,
        s: int,
    ) -> torch.Tensor:
        """The lightning indexer's exact-path scores (attention.Indexer): [B, S(query), S(key)] fp32."""
        cfg = self.cfg
        nh, hd, r = ix.n_heads, ix.head_dim, ix.rope_dim
        k = ix.wk(xf)
        k = F.layer_norm(k.float(), (hd,), ix.k_norm.weight.float(), ix.k_norm.bias.float(), 1e-6).to(k.dtype)
        k = torch.cat([rope_ref(k[..., :r], cn, sn, cfg.indexer_rope_interleave), k[..., r:]], dim=-1)
        q = ix.wq_b(q_resid).view(-1, nh, hd)
        q = torch.cat([rope_ref(q[..., :r], cn, sn, cfg.indexer_rope_interleave), q[..., r:]], dim=-1)
        w = F.linear(xf.float(), ix.weights_proj.weight.float()) * nh**-0.5
        qk = torch.einsum("bshd,btd->bhst", q.reshape(b, s, nh, hd).float(), k.reshape(b, s, hd).float())
        return torch.einsum("bsh,bhst->bst", w.view(b, s, nh), F.relu(qk * ix.softmax_scale))

    def _moe(self, moe: MoE, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """MoE.forward with every routed expert computed densely (no host sync) and combined by the
        router's weights (zero for the experts a token does not use)."""
        b, s, d = x.shape
        xf = x.reshape(-1, d)
        weights, ids = moe.gate(xf)
        e = moe.w13.shape[0]
        combine = torch.zeros(xf.shape[0], e, device=x.device, dtype=torch.float32).scatter(1, ids, weights.float())
        gate, up = torch.einsum("nd,eid->nei", xf, moe.w13).chunk(2, dim=-1)
        y = torch.einsum("nei,edi->ned", F.silu(gate) * up, moe.w2)
        out = torch.einsum("ne,ned->nd", combine.to(y.dtype), y)
        if moe.shared_experts is not None:
            out = out + moe.shared_experts(xf)
        load = torch.bincount(ids.flatten(), minlength=e)
        return out.reshape(b, s, d), load


# ---------------------------------------------------------------------------------------------------
# initialisation, checkpoints


@torch.no_grad()
def init_weights(net: DeepseekV32, seed: int = 0) -> None:
    """GPT-2-style: linears and embedding N(0, 0.02), output projections scaled by 1/sqrt(2 * layers),
    norms 1, biases 0."""
    g = torch.Generator().manual_seed(seed)
    depth = net.cfg.num_hidden_layers + 1
    for name, p in net.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        parent = name.rsplit(".", 2)[-2] if "." in name else ""
        if "norm" in parent or name.endswith(("k_norm.weight", "k_norm.bias")):
            p.copy_(torch.zeros_like(p) if leaf == "bias" else torch.ones_like(p))
            continue
        std = 0.02
        if name.endswith(("o_proj.weight", "down_proj.weight", ".w2")):
            std /= math.sqrt(2 * depth)
        p.copy_(torch.randn(p.shape, generator=g) * std)
    for m in net.modules():
        if isinstance(m, Gate):
            m.e_score_correction_bias.zero_()


def build_network(cfg: ModelConfig, device: torch.device | str, seed: int = 0) -> DeepseekV32:
    net = DeepseekV32(cfg, with_mtp=cfg.num_nextn_predict_layers > 0)
    init_weights(net, seed)
    net.to(device)
    net.rotary.inv_freq = net.rotary.inv_freq.to(device)
    return net


def state_tensors(net: DeepseekV32) -> dict[str, torch.Tensor]:
    """The network's tensors under their checkpoint names (shipped_tensors), bf16 except the router bias."""
    cfg = net.cfg
    params: dict[str, torch.Tensor] = dict(net.named_parameters())
    params.update(dict(net.named_buffers()))
    out: dict[str, torch.Tensor] = {}
    for name in shipped_tensors(cfg):
        if name.endswith(".mlp.experts.gate_up_proj"):
            t = params[name.replace(".experts.gate_up_proj", ".w13")]
        elif name.endswith(".mlp.experts.down_proj"):
            t = params[name.replace(".experts.down_proj", ".w2")]
        else:
            t = params[name]
        t = t.detach().cpu()
        out[name] = t.float().contiguous() if name.endswith("e_score_correction_bias") else t.to(torch.bfloat16)
    return out


def save_checkpoint(net: DeepseekV32, tokenizer_dir: Path, out: Path, metrics: dict[str, Any] | None = None) -> None:
    """Write a checkpoint directory the project's loader reads (atomically: a temp dir renamed)."""
    from safetensors.torch import save_file

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(state_tensors(net), str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(net.cfg.to_hf_dict(), indent=2) + "\n")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(tokenizer_dir / f, tmp / f)
    (tmp / "generation_config.json").write_text(
        json.dumps({"bos_token_id": net.cfg.bos_token_id, "eos_token_id": net.cfg.eos_token_id}, indent=2) + "\n"
    )
    if metrics is not None:
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    if out.exists():
        old = out.with_name(out.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)


def load_into(net: DeepseekV32, ckpt: Path) -> None:
    """Copy a checkpoint's weights (as save_checkpoint writes them) into `net` (fp32 master weights)."""
    from .loader import load

    src = load(ckpt, device="cpu", dtype=torch.float32)
    with torch.no_grad():
        mine: dict[str, torch.Tensor] = dict(net.named_parameters())
        mine.update(dict(net.named_buffers()))
        for name, t in list(src.named_parameters()) + list(src.named_buffers()):
            if name in mine:
                mine[name].copy_(t.to(mine[name].dtype))


# ---------------------------------------------------------------------------------------------------
# training


@dataclass
class Schedule:
    """Phases and learning rate as functions of progress in [0, 1]: the larger of the fractions of the
    training clock (seconds of training, `total_s`) and of the token budget (`total_tokens`) spent."""

    total_s: float
    total_tokens: float = math.inf
    dense_frac: float = 0.40
    warmup_frac: float = 0.08  # indexer warm-up, after the dense phase
    lr: float = 3e-3
    indexer_lr: float = 1e-3
    min_lr_frac: float = 0.1
    lr_warmup_frac: float = 0.03

    def progress(self, t: float, tokens: float) -> float:
        return max(t / self.total_s, tokens / self.total_tokens)

    def phase(self, f: float) -> str:
        if f < self.dense_frac:
            return "dense"
        if f < self.dense_frac + self.warmup_frac:
            return "warmup"
        return "sparse"

    def lr_at(self, f: float) -> float:
        f = min(f, 1.0)
        if f < self.lr_warmup_frac:
            return self.lr * f / self.lr_warmup_frac
        prog = (f - self.lr_warmup_frac) / (1 - self.lr_warmup_frac)
        return self.lr * (self.min_lr_frac + (1 - self.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * prog)))


def batches(stream: torch.Tensor, batch: int, seq: int, gen: torch.Generator) -> Iterator[torch.Tensor]:
    """Random windows of seq + 1 tokens: [batch, seq + 1], on the stream's device."""
    hi = stream.numel() - seq - 1
    offs = torch.arange(seq + 1, device=stream.device)
    while True:
        starts = torch.randint(0, hi, (batch,), generator=gen).to(stream.device)
        yield stream[starts[:, None] + offs]


def losses(fwd: TrainForward, window: torch.Tensor, mode: Mode) -> tuple[torch.Tensor, torch.Tensor, ForwardOut]:
    """window [B, S+1] -> (main CE, MTP CE, forward output)."""
    inp, tgt = window[:, :-1], window[:, 1:]
    out = fwd(inp, mode, next_ids=window[:, 1:-1])
    ce = F.cross_entropy(out.logits.flatten(0, 1), tgt.flatten())
    mtp_ce = (
        F.cross_entropy(out.mtp_logits.flatten(0, 1), window[:, 2:].flatten())
        if out.mtp_logits is not None
        else ce.new_zeros(())
    )
    return ce, mtp_ce, out


def _indexer_param(name: str) -> bool:
    return ".self_attn.indexer." in name


def train(args: argparse.Namespace) -> dict[str, Any]:
    t_start = time.monotonic()
    torch.manual_seed(args.seed)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    corpus = Path(args.corpus) if args.corpus else None
    tok_dir = Path(args.tokenizer) if args.tokenizer else out / "tokenizer"
    if not (tok_dir / "tokenizer.json").exists():
        log.info("training the tokenizer (vocab %d) into %s", args.vocab_size, tok_dir)
        train_tokenizer(args.vocab_size, tok_dir, corpus)
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    cfg = pycoder_config(vocab)
    if args.tiny:
        cfg = replace(cfg, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, index_topk=32)
    train_stream = token_stream(tokenizer, corpus_texts("train", corpus, args.with_tests))
    valid_stream = token_stream(tokenizer, corpus_texts("valid", corpus, args.with_tests))
    held_stream = token_stream(tokenizer, corpus_texts("heldout", corpus, args.with_tests))
    log.info(
        "data: %d train, %d validation, %d held-out tokens, %.1f s; model %d parameters (%.2f MB bf16)",
        train_stream.numel(),
        valid_stream.numel(),
        held_stream.numel(),
        time.monotonic() - t_start,
        count_params(cfg),
        count_params(cfg) * 2 / 1e6,
    )
    net = build_network(cfg, device, args.seed)
    state: dict[str, Any] = {"train_s": 0.0, "step": 0, "tokens": 0}
    resume = Path(args.resume) if args.resume else None
    if resume is not None:
        load_into(net, resume / "checkpoint")
        st = json.loads((resume / "train_state.json").read_text())
        state.update(st["state"])
        log.info("resumed from %s at %.0f s of training, step %d", resume, state["train_s"], state["step"])
    net.train()
    fwd = TrainForward(net)
    budget_end = t_start + args.time_budget_s - args.eval_reserve_s
    total_train = args.total_train_s or max(1.0, budget_end - time.monotonic())
    sched = Schedule(
        total_s=total_train,
        total_tokens=args.max_epochs * train_stream.numel() if args.max_epochs else math.inf,
        lr=args.lr,
        dense_frac=args.dense_frac,
        warmup_frac=args.warmup_frac,
    )
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, p in net.named_parameters():
        (decay if p.dim() >= 2 and "embed" not in name else no_decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
        eps=1e-8,
        fused=device.type == "cuda",
    )
    gen = torch.Generator().manual_seed(args.seed + state["step"])
    data = batches(train_stream.to(device), args.batch, args.seq, gen)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda" and not args.fp32)
    moes = [m for m in net.modules() if isinstance(m, MoE)]
    history: list[dict[str, Any]] = []
    last_save = time.monotonic()
    phase = None
    t_loop = time.monotonic()
    base_train_s = state["train_s"]
    while True:
        now = time.monotonic()
        train_s = base_train_s + (now - t_loop)
        prog = sched.progress(train_s, state["tokens"])
        if now >= budget_end or prog >= 1.0:
            break
        new_phase = sched.phase(prog)
        if new_phase != phase:
            phase = new_phase
            frozen = phase == "warmup"
            for name, p in net.named_parameters():
                if phase == "dense":
                    p.requires_grad_(not _indexer_param(name))
                else:
                    p.requires_grad_(_indexer_param(name) or not frozen)
            log.info("phase %s at %.0f s, progress %.3f (step %d)", phase, train_s, prog, state["step"])
        lr = sched.lr_at(prog)
        for grp in opt.param_groups:
            grp["lr"] = lr if phase != "warmup" else args.indexer_lr
        mode = Mode(sparse=phase == "sparse", indexer=phase != "dense")
        window = next(data).to(device, non_blocking=True)
        with amp:
            ce, mtp_ce, fo = losses(fwd, window, mode)
            if phase == "warmup":
                loss = fo.indexer_kl
            else:
                loss = ce + args.mtp_weight * mtp_ce + (fo.indexer_kl if mode.indexer else 0.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in net.parameters() if p.requires_grad], 1.0)
        opt.step()
        with torch.no_grad():  # auxiliary-loss-free balance (DeepSeek-V3): bias up for underloaded experts
            if phase != "warmup":
                for m, load in zip(moes, fo.expert_load):
                    load = load.float()
                    m.gate.e_score_correction_bias.add_(args.bias_rate * torch.sign(load.mean() - load))
        state["step"] += 1
        state["tokens"] += window.numel()
        if state["step"] % args.log_every == 0 or state["step"] == 1:
            rec = {
                "step": state["step"],
                "train_s": round(train_s, 1),
                "phase": phase,
                "progress": round(prog, 4),
                "lr": lr,
                "ce": ce.item(),
                "mtp_ce": mtp_ce.item(),
                "indexer_kl": fo.indexer_kl.item(),
            }
            history.append(rec)
            log.info("%s", rec)
        if time.monotonic() - last_save > args.save_every_s:
            t_pause = time.monotonic()
            state["train_s"] = base_train_s + (t_pause - t_loop)
            val = evaluate(net, tokenizer, valid_stream, args.seq, args.valid_tokens, device)
            history.append({"step": state["step"], "train_s": round(state["train_s"], 1), "valid": val})
            log.info("validation at step %d: %s", state["step"], val)
            _save(net, tok_dir, out, state, history, args, None)
            last_save = time.monotonic()
            t_loop += last_save - t_pause  # validation and saving are not training time
    state["train_s"] = base_train_s + (time.monotonic() - t_loop)
    net.eval()
    t_eval = time.monotonic()
    metrics = evaluate(net, tokenizer, held_stream, args.seq, args.eval_tokens, device)
    metrics["valid"] = evaluate(net, tokenizer, valid_stream, args.seq, args.valid_tokens, device)
    metrics["train"] = {
        "steps": state["step"],
        "tokens": state["tokens"],
        "train_s": round(state["train_s"], 1),
        "total_train_s": total_train,
        "final_phase": phase,
        "params": count_params(cfg),
        "train_tokens": train_stream.numel(),
        "valid_tokens": valid_stream.numel(),
        "heldout_tokens": held_stream.numel(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "args": {k: v for k, v in vars(args).items() if k != "func"},
    }
    metrics["eval_s"] = round(time.monotonic() - t_eval, 1)
    metrics["history"] = history
    _save(net, tok_dir, out, state, history, args, metrics)
    log.info("done in %.0f s: %s", time.monotonic() - t_start, {k: v for k, v in metrics.items() if k != "history"})
    return metrics


def _save(
    net: DeepseekV32,
    tok_dir: Path,
    out: Path,
    state: dict[str, Any],
    history: list[dict[str, Any]],
    args: argparse.Namespace,
    metrics: dict[str, Any] | None,
) -> None:
    save_checkpoint(net, tok_dir, out / "checkpoint", metrics)
    (out / "train_state.json").write_text(json.dumps({"state": state, "history": history}, indent=1) + "\n")
    log.info("saved %s at step %d", out / "checkpoint", state["step"])


# ---------------------------------------------------------------------------------------------------
# evaluation


def token_byte_lengths(tokenizer: Any) -> torch.Tensor:
    """[vocab] the number of UTF-8 bytes each token stands for (0 for special/added tokens)."""
    from .tokenizer import TokenBytes

    tb = TokenBytes(tokenizer, skip_special_tokens=True)
    n = tokenizer.get_vocab_size(with_added_tokens=True)
    added = set(tokenizer.get_added_tokens_decoder())
    return torch.tensor([0 if i in added else len(tb.raw(i)) for i in range(n)], dtype=torch.float64)


@torch.no_grad()
def evaluate(
    net: DeepseekV32,
    tokenizer: Any,
    stream: torch.Tensor,
    seq: int,
    max_tokens: int,
    device: torch.device,
    batch: int = 16,
) -> dict[str, Any]:
    """Held-out loss (sparse = as served, and dense), bits per byte, MTP loss and top-1 accuracy, over
    non-overlapping windows of seq + 1 tokens from the start of `stream` (up to max_tokens)."""
    fwd = TrainForward(net)
    nwin = max(1, min(max_tokens, stream.numel() - 1) // (seq + 1))
    windows = stream[: nwin * (seq + 1)].view(nwin, seq + 1)
    blen = token_byte_lengths(tokenizer)
    sums = {"sparse": 0.0, "dense": 0.0, "mtp": 0.0, "mtp_hits": 0.0, "main_hits": 0.0}
    ntok = nmtp = 0
    nbytes = 0.0
    for i in range(0, nwin, batch):
        w = windows[i : i + batch].to(device)
        for name, sparse in (("sparse", True), ("dense", False)):
            out = fwd(w[:, :-1], Mode(sparse=sparse), next_ids=w[:, 1:-1] if sparse else None)
            sums[name] += F.cross_entropy(out.logits.flatten(0, 1), w[:, 1:].flatten(), reduction="sum").item()
            if sparse:
                sums["main_hits"] += (out.logits.argmax(-1) == w[:, 1:]).sum().item()
                if out.mtp_logits is not None:
                    t2 = w[:, 2:]
                    sums["mtp"] += F.cross_entropy(out.mtp_logits.flatten(0, 1), t2.flatten(), reduction="sum").item()
                    sums["mtp_hits"] += (out.mtp_logits.argmax(-1) == t2).sum().item()
                    nmtp += t2.numel()
        ntok += w[:, 1:].numel()
        nbytes += blen[w[:, 1:].cpu()].sum().item()
    sparse_loss, dense_loss = sums["sparse"] / ntok, sums["dense"] / ntok
    return {
        "tokens_evaluated": ntok,
        "bytes_evaluated": nbytes,
        "seq": seq,
        "loss_sparse": sparse_loss,
        "loss_dense": dense_loss,
        "sparse_minus_dense": sparse_loss - dense_loss,
        "bits_per_byte": sums["sparse"] / nbytes / math.log(2),
        "bits_per_token": sparse_loss / math.log(2),
        "top1_acc": sums["main_hits"] / ntok,
        "mtp_loss": sums["mtp"] / max(nmtp, 1),
        "mtp_top1_acc": sums["mtp_hits"] / max(nmtp, 1),
    }


def unigram_loss(train_stream: torch.Tensor, eval_stream: torch.Tensor, vocab: int) -> float:
    """Cross-entropy (nats/token) of eval_stream under the add-one unigram distribution of train_stream."""
    counts = torch.bincount(train_stream, minlength=vocab).double() + 1.0
    logp = (counts / counts.sum()).log()
    return float(-logp[eval_stream].mean())


# ---------------------------------------------------------------------------------------------------
# CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output directory: checkpoint/, train_state.json, tokenizer/")
    p.add_argument("--tokenizer", default=None, help="directory with tokenizer.json (default: train one into OUT)")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--corpus", default=None, help="directory of .py files (default: this Python's standard library)")
    p.add_argument(
        "--with-tests", action="store_true", help="train (and evaluate) on the test suites' files too (TEST_DIRS)"
    )
    p.add_argument(
        "--resume",
        default=None,
        help="an earlier OUT to continue from: its checkpoint's weights, router biases and training clock "
        "(the optimizer's moments restart)",
    )
    p.add_argument("--time-budget-s", type=float, default=480.0, help="wall time of this call, all included")
    p.add_argument("--eval-reserve-s", type=float, default=45.0, help="of the budget, kept for evaluation + save")
    p.add_argument(
        "--total-train-s",
        type=float,
        default=None,
        help="training seconds the schedule spans (over all calls with --resume); default: this call's",
    )
    p.add_argument(
        "--max-epochs",
        type=float,
        default=10.0,
        help="token budget of the schedule in passes over the train split (0: time only); the first limit reached ends it",
    )
    p.add_argument("--batch", type=int, default=32, help="sequences per step")
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--indexer-lr", type=float, default=1e-3)
    p.add_argument("--dense-frac", type=float, default=0.40)
    p.add_argument("--warmup-frac", type=float, default=0.08)
    p.add_argument("--mtp-weight", type=float, default=0.3)
    p.add_argument("--bias-rate", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--fp32", action="store_true", help="no bf16 autocast on cuda")
    p.add_argument("--tiny", action="store_true", help="a much smaller model (CPU smoke runs)")
    p.add_argument("--save-every-s", type=float, default=120.0)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--eval-tokens", type=int, default=200_000, help="held-out tokens of the final evaluation")
    p.add_argument("--valid-tokens", type=int, default=50_000, help="validation tokens at each save")


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_float32_matmul_precision("high")
    torch.set_num_threads(min(16, os.cpu_count() or 1))
    random.seed(args.seed)
    return train(args)


def main(argv: Sequence[str] | None = None, prog: str = "python -m splitserve.model.training") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    run(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
