"""model/training.py: the training forward is the inference network's math (same parameters, same
logits as the engine), the indexer warm-up trains the indexer alone, and a short CPU run lowers the
loss and writes a checkpoint the project's loader reads (and --resume continues)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from splitserve.engine.config import EngineConfig
from splitserve.engine.engine import Engine
from splitserve.engine.sampling_params import SamplingParams
from splitserve.model import DenseStore, ForwardBatch, load
from splitserve.model.training import (
    Mode,
    TrainForward,
    main,
    pycoder_config,
    save_checkpoint,
    split_of,
)

ROOT = Path(__file__).resolve().parents[2]


def _ids(n: int, vocab: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.cat([torch.zeros(1, dtype=torch.long), torch.randint(2, vocab, (n - 1,), generator=g)])


def test_training_forward_matches_the_network_sparse_and_mtp(tiny_checkpoint: Path) -> None:
    """On the tiny preset (index_topk 32) over 100 tokens the sparse training forward gives the
    inference network's cache-free logits, and its MTP logits equal mtp_forward's; dense attention
    gives different logits (so the selection is really active)."""
    net = load(tiny_checkpoint, dtype=torch.float32)
    ids = _ids(100, net.cfg.vocab_size)
    fwd = TrainForward(net)
    with torch.no_grad():
        out = fwd(ids[None], Mode(sparse=True), next_ids=ids[None, 1:])
        dense = fwd(ids[None], Mode(sparse=False)).logits[0]
    ref = net.score(ids)
    torch.testing.assert_close(out.logits[0], ref, rtol=1e-4, atol=1e-4)
    assert (dense - ref).abs().max() > 1e-2

    hidden = net.forward(ForwardBatch.single(ids, DenseStore()))
    mtp = net.logits(net.mtp_forward(hidden[:-1], ids[1:], ForwardBatch.single(ids[:-1], DenseStore())))
    assert out.mtp_logits is not None
    torch.testing.assert_close(out.mtp_logits[0], mtp, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("paged", [False, True])
def test_engine_prompt_logprobs_equal_the_training_forward(tiny_checkpoint: Path, paged: bool) -> None:
    """The engine prefilling in chunks through its cache (spans, or the paged rows path) reports the
    same prompt logprobs and top-5 as log_softmax of the training forward's logits."""
    net = load(tiny_checkpoint, dtype=torch.float32)
    ids = _ids(90, net.cfg.vocab_size, seed=1)
    with torch.no_grad():
        logp = torch.log_softmax(TrainForward(net)(ids[None], Mode(sparse=True)).logits[0], -1)
    eng = Engine(net, EngineConfig(num_blocks=16, block_size=16, chunk_size=24, paged_kernels=paged))
    res = eng.generate([ids.tolist()], SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=5))[0]
    assert res.prompt_logprobs is not None and res.prompt_logprobs[0] is None
    for j in range(1, len(ids)):
        entry = res.prompt_logprobs[j]
        assert entry is not None
        assert math.isclose(entry.logprob, logp[j - 1, ids[j]].item(), rel_tol=1e-4, abs_tol=1e-4)
        top = [t for t, _ in entry.top]
        assert top == logp[j - 1].topk(5).indices.tolist()


def test_indexer_warmup_trains_only_the_indexer(tiny_checkpoint: Path) -> None:
    """Dense warm-up: the KL to the main attention falls and no other parameter moves."""
    net = load(tiny_checkpoint, dtype=torch.float32)
    for name, p in net.named_parameters():
        p.requires_grad_(".self_attn.indexer." in name)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=3e-3)
    fwd = TrainForward(net)
    ids = torch.stack([_ids(64, net.cfg.vocab_size, seed=s) for s in range(4)])
    kls = []
    for _ in range(30):
        out = fwd(ids, Mode(sparse=False, indexer=True), next_ids=ids[:, 1:])
        opt.zero_grad()
        out.indexer_kl.backward()
        opt.step()
        kls.append(out.indexer_kl.item())
    assert kls[-1] < 0.7 * kls[0], kls
    for name, p in net.named_parameters():
        moved = not torch.equal(before[name], p.detach())
        assert moved == (".self_attn.indexer." in name), name


def test_sparse_training_keeps_the_lm_loss_away_from_the_indexer(tiny_checkpoint: Path) -> None:
    """In sparse training the LM loss gives the indexer no gradient (top-k is a selection, its inputs
    detached) and the KL gives the main model none."""
    net = load(tiny_checkpoint, dtype=torch.float32)
    ids = _ids(80, net.cfg.vocab_size, seed=2)[None]
    out = TrainForward(net)(ids, Mode(sparse=True, indexer=True), next_ids=ids[:, 1:])
    params = dict(net.named_parameters())
    ce = F.cross_entropy(out.logits[0, :-1], ids[0, 1:])
    g_ce = torch.autograd.grad(ce, list(params.values()), allow_unused=True, retain_graph=True)
    g_kl = torch.autograd.grad(out.indexer_kl, list(params.values()), allow_unused=True)
    for (name, _), gc, gk in zip(params.items(), g_ce, g_kl):
        if ".self_attn.indexer." in name:
            assert gc is None or not gc.any(), name
            assert gk is not None and gk.abs().sum() > 0, name
        else:
            assert gk is None or not gk.any(), name


def _corpus(root: Path) -> Path:
    """A few dozen small Python files, at least two in each split."""
    root.mkdir()
    counts = {"train": 0, "valid": 0, "heldout": 0}
    i = 0
    while min(counts.values()) < 2 or sum(counts.values()) < 60:
        name = f"mod_{i}.py"
        i += 1
        split = split_of(name)
        if counts[split] >= 40 and split == "train":
            continue
        counts[split] += 1
        body = "\n\n".join(
            f"def f{i}_{j}(x, y):\n    total = 0\n    for k in range(x):\n        total += k * y + {j}\n    return total\n"
            for j in range(12)
        )
        (root / name).write_text(f'"""Module {i}."""\n\nimport os\n\n{body}\n')
    return root


def test_short_run_lowers_the_loss_writes_a_loadable_checkpoint_and_resumes(tmp_path: Path) -> None:
    corpus = _corpus(tmp_path / "corpus")
    common = ["--corpus", str(corpus), "--tokenizer", str(ROOT / "model" / "pycoder"), "--tiny", "--seq", "64"]
    common += ["--batch", "4", "--eval-reserve-s", "10", "--eval-tokens", "2000", "--valid-tokens", "500"]
    common += ["--log-every", "5", "--save-every-s", "1000", "--max-epochs", "0"]
    out = tmp_path / "run"
    assert main(["--out", str(out), "--time-budget-s", "40", "--total-train-s", "40", *common]) == 0
    metrics = json.loads((out / "checkpoint" / "metrics.json").read_text())
    hist = [h for h in metrics["history"] if "ce" in h]
    assert hist[-1]["ce"] < hist[0]["ce"] - 1.0, hist
    assert metrics["loss_sparse"] < math.log(4096) - 1.0
    net = load(out / "checkpoint", dtype=torch.float32)  # the project's loader, MTP layer included
    assert net.has_mtp and net.cfg.index_topk == 32
    with torch.no_grad():
        ids = _ids(50, net.cfg.vocab_size)
        torch.testing.assert_close(
            TrainForward(net)(ids[None], Mode(sparse=True)).logits[0], net.score(ids), rtol=1e-4, atol=1e-4
        )
    state = json.loads((out / "train_state.json").read_text())["state"]
    out2 = tmp_path / "run2"
    main(["--out", str(out2), "--resume", str(out), "--time-budget-s", "25", "--total-train-s", "60", *common])
    state2 = json.loads((out2 / "train_state.json").read_text())["state"]
    assert state2["step"] > state["step"] and state2["train_s"] > state["train_s"]


def test_save_checkpoint_leaves_out_the_mtp_copies_and_loads(tmp_path: Path, tiny_checkpoint: Path) -> None:
    net = load(tiny_checkpoint, dtype=torch.float32)
    with torch.no_grad():  # the checkpoint holds bf16: round here so that the two nets are the same
        for p in net.parameters():
            p.copy_(p.bfloat16().float())
    save_checkpoint(net, ROOT / "model" / "pycoder", tmp_path / "ck")
    from safetensors import safe_open

    with safe_open(tmp_path / "ck" / "model.safetensors", framework="pt") as sf:
        names = set(sf.keys())
    mtp = f"model.layers.{net.cfg.num_hidden_layers}."
    assert not {mtp + "embed_tokens.weight", mtp + "shared_head.head.weight"} & names
    again = load(tmp_path / "ck", dtype=torch.float32)
    ids = _ids(40, net.cfg.vocab_size)
    torch.testing.assert_close(again.score(ids), net.score(ids), rtol=1e-5, atol=1e-5)


def test_pycoder_config_is_the_v32_architecture_with_active_sparsity() -> None:
    cfg = pycoder_config()
    assert cfg.n_shared_experts == 1 and cfg.n_routed_experts > cfg.num_experts_per_tok
    assert cfg.first_k_dense_replace == 1 and cfg.num_hidden_layers > 1
    assert cfg.num_nextn_predict_layers == 1
    assert cfg.index_topk < 512  # below the training context: the indexer selects
