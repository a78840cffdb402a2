"""Logits of splitserve's network equal transformers' DeepseekV32ForCausalLM on checkpoints that
transformers itself writes (save_pretrained), float32, relative error < 1e-4."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import DeepseekV32Config, DeepseekV32ForCausalLM  # noqa: E402

from splitserve.model import ForwardBatch, load  # noqa: E402

YARN = {
    "rope_type": "yarn",
    "rope_theta": 10000.0,
    "factor": 40.0,
    "original_max_position_embeddings": 64,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
}
DEFAULT_ROPE = {"rope_type": "default", "rope_theta": 10000.0}


def small_config(*, rope: dict, layers: int = 3, dense: int = 1, topk: int = 8, **kw) -> DeepseekV32Config:
    args = dict(
        vocab_size=160,
        hidden_size=64,
        intermediate_size=96,
        moe_intermediate_size=32,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        n_shared_experts=1,
        n_routed_experts=8,
        kv_lora_rank=32,
        q_lora_rank=48,
        qk_rope_head_dim=16,
        v_head_dim=24,
        qk_nope_head_dim=32,
        n_group=2,
        topk_group=1,
        num_experts_per_tok=2,
        index_topk=topk,
        index_head_dim=32,
        index_n_heads=4,
        first_k_dense_replace=dense,
        max_position_embeddings=4096,
        rope_parameters=dict(rope),
    )
    args.update(kw)
    return DeepseekV32Config(**args)


def random_reference(cfg: DeepseekV32Config, seed: int) -> DeepseekV32ForCausalLM:
    torch.manual_seed(seed)
    ref = DeepseekV32ForCausalLM(cfg).eval()
    with torch.no_grad():  # weights with real spread (the default init is near-degenerate)
        for name, p in ref.named_parameters():
            if "norm" in name:
                p.uniform_(0.6, 1.4)
            else:
                p.normal_(0, 1.0 / p.shape[-1] ** 0.5 if p.dim() > 1 else 0.1)
        for m in ref.modules():
            if hasattr(m, "e_score_correction_bias"):
                m.e_score_correction_bias.normal_(0, 0.1)
    return ref


CASES = {
    "yarn-moe-sparse": (dict(rope=YARN), 40),  # 40 tokens > index_topk 8: sparsity active
    "yarn-moe-dense-attn": (dict(rope=YARN, topk=64), 24),  # shorter than index_topk
    "default-rope-moe-sparse": (dict(rope=DEFAULT_ROPE), 33),
    "dense-ffn-only": (dict(rope=YARN, layers=2, dense=2), 30),
    "all-moe-3groups": (
        dict(rope=DEFAULT_ROPE, dense=0, n_routed_experts=12, n_group=3, topk_group=2, num_experts_per_tok=3),
        20,
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(case: str, tmp_path) -> None:
    kw, seq = CASES[case]
    cfg = small_config(**kw)
    ref = random_reference(cfg, seed=hash(case) % 1000)
    ref.save_pretrained(tmp_path)
    net = load(tmp_path, dtype=torch.float32)
    ids = torch.randint(0, cfg.vocab_size, (seq,), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expect = ref(ids[None]).logits[0].float()
    got = net.score(ids)
    rel = ((got - expect).abs().max() / expect.abs().max()).item()
    assert rel < 1e-4, f"{case}: relative error {rel:.2e}"


def test_absorbed_form_equals_decompressed(tmp_path) -> None:
    """The decode (absorbed) form of MLA gives the same logits as the prefill (decompressed) form."""
    cfg = small_config(rope=YARN)
    random_reference(cfg, seed=3).save_pretrained(tmp_path)
    net = load(tmp_path, dtype=torch.float32)
    ids = torch.randint(0, cfg.vocab_size, (36,), generator=torch.Generator().manual_seed(1))
    a = net.score(ids)
    b = net.logits(net.forward(ForwardBatch.single(ids, absorbed=True)))
    assert ((a - b).abs().max() / a.abs().max()).item() < 1e-5


def test_mtp_layer_matches_a_transformers_decoder_block(tiny_checkpoint, tmp_path) -> None:
    """MTP = eh_proj([enorm(emb) ‖ hnorm(h)]) -> one decoder block -> shared_head.norm -> LM head.

    Reference: a one-layer transformers model holding the MTP block's weights, fed u as inputs_embeds,
    its final norm set to shared_head.norm and its head to the LM head."""
    import json

    from safetensors.torch import load_file, save_file

    net = load(tiny_checkpoint, dtype=torch.float32)
    cfg = net.cfg
    n = cfg.mtp_layer_index
    hf = json.loads((tiny_checkpoint / "config.json").read_text())
    hf.update(num_hidden_layers=1, first_k_dense_replace=0)
    src = {}
    for f in tiny_checkpoint.glob("*.safetensors"):
        src.update(load_file(f))
    block = {
        k.replace(f"model.layers.{n}.", "model.layers.0."): v
        for k, v in src.items()
        if k.startswith(f"model.layers.{n}.")
        and not any(s in k for s in ("enorm", "hnorm", "eh_proj", "shared_head", "embed_tokens"))
    }
    block["model.embed_tokens.weight"] = src["model.embed_tokens.weight"]
    block["model.norm.weight"] = src[f"model.layers.{n}.shared_head.norm.weight"]
    block["lm_head.weight"] = src["lm_head.weight"]
    (tmp_path / "config.json").write_text(json.dumps(hf))
    save_file({k: v.float().contiguous() for k, v in block.items()}, str(tmp_path / "model.safetensors"))
    ref = DeepseekV32ForCausalLM.from_pretrained(tmp_path, torch_dtype=torch.float32).eval()

    g = torch.Generator().manual_seed(0)
    s = 12
    hidden = torch.randn(s, cfg.hidden_size, generator=g)
    next_ids = torch.randint(0, cfg.vocab_size, (s,), generator=g)
    got = net.logits(net.mtp_forward(hidden, next_ids, ForwardBatch.single(next_ids)))
    mtp = net.mtp
    with torch.no_grad():
        u = mtp.eh_proj(torch.cat([mtp.enorm(net.model.embed_tokens(next_ids)), mtp.hnorm(hidden)], -1))
        expect = ref(inputs_embeds=u[None]).logits[0].float()
    assert ((got - expect).abs().max() / expect.abs().max()).item() < 1e-4
