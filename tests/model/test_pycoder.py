"""The shipped trained checkpoint (model/pycoder): in budget, loadable, its tokenizer loadable by
transformers and by the project alike, the engine computing exactly what training optimised, and a
model that has learned Python (held-out loss far below the unigram baseline, a completion that
compiles)."""

from __future__ import annotations

import pytest
import torch

from splitserve.engine.config import EngineConfig
from splitserve.engine.engine import Engine
from splitserve.engine.sampling_params import SamplingParams
from splitserve.model import load
from splitserve.model.presets import DEFAULT_MODEL, SHIPPED, resolve_checkpoint
from splitserve.model.tokenizer import (
    ASSISTANT_TOKEN,
    BOS_TOKEN,
    BOS_TOKEN_ID,
    DSML_TOKEN,
    EOS_TOKEN,
    EOS_TOKEN_ID,
    THINK_END_TOKEN,
    THINK_START_TOKEN,
    USER_TOKEN,
    load_tokenizer,
)
from splitserve.model.training import (
    Mode,
    TrainForward,
    corpus_texts,
    evaluate,
    pycoder_config,
    token_stream,
    unigram_loss,
)

PATH = SHIPPED["pycoder"]
BUDGET = 6 * 2**20  # bytes: weights + tokenizer + config, all files of the directory


@pytest.fixture(scope="module")
def net() -> torch.nn.Module:
    return load(PATH, dtype=torch.float32)


@pytest.fixture(scope="module")
def heldout() -> list[str]:
    return corpus_texts("heldout")


def test_the_default_model_is_the_shipped_checkpoint_within_budget() -> None:
    assert DEFAULT_MODEL == "pycoder" and resolve_checkpoint("pycoder") == PATH
    files = sorted(p.name for p in PATH.iterdir())
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(files)
    total = sum(p.stat().st_size for p in PATH.iterdir())
    assert total <= BUDGET, f"{total} bytes in {files}"


def test_shipped_config_is_the_training_modules_config(net: torch.nn.Module) -> None:
    assert net.cfg == pycoder_config(net.cfg.vocab_size)
    assert net.has_mtp


def test_transformers_and_project_tokenizers_agree(heldout: list[str]) -> None:
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(PATH))
    ours = load_tokenizer(PATH)
    assert (hf.bos_token_id, hf.eos_token_id) == (BOS_TOKEN_ID, EOS_TOKEN_ID)
    for text in heldout[:8] + ["def fibonacci(n):\n    return n", "x = 'café ☕'\n"]:
        ids = ours.encode(text, add_special_tokens=False).ids
        assert hf.encode(text, add_special_tokens=False) == ids
        assert hf.decode(ids) == ours.decode(ids) == text
    for t, tid in ((BOS_TOKEN, 0), (EOS_TOKEN, 1)):
        assert hf.convert_tokens_to_ids(t) == ours.token_to_id(t) == tid
    for t in (THINK_START_TOKEN, THINK_END_TOKEN, USER_TOKEN, ASSISTANT_TOKEN, DSML_TOKEN):
        tid = ours.token_to_id(t)
        assert tid is not None and hf.convert_tokens_to_ids(t) == tid
        assert ours.encode(f"a{t}b", add_special_tokens=False).ids.count(tid) == 1  # one token, not split


def test_engine_logits_equal_the_training_forward(net: torch.nn.Module, heldout: list[str]) -> None:
    """fp32, a held-out prompt longer than index_topk (sparse attention active), prefilled in chunks
    through the engine's cache: the prompt logprobs equal log_softmax of the training forward."""
    tok = load_tokenizer(PATH)
    ids = [BOS_TOKEN_ID] + tok.encode(heldout[0], add_special_tokens=False).ids[: net.cfg.index_topk + 100]
    with torch.no_grad():
        logp = torch.log_softmax(TrainForward(net)(torch.tensor([ids]), Mode(sparse=True)).logits[0], -1)
    eng = Engine(net, EngineConfig(num_blocks=16, block_size=64, chunk_size=96))
    res = eng.generate([ids], SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=1))[0]
    assert res.prompt_logprobs is not None
    got = torch.tensor([e.logprob for e in res.prompt_logprobs[1:] if e is not None])
    want = logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_heldout_loss_is_far_below_the_unigram_baseline(net: torch.nn.Module, heldout: list[str]) -> None:
    tok = load_tokenizer(PATH)
    stream = token_stream(tok, heldout)
    m = evaluate(net, tok, stream, 256, 8192, torch.device("cpu"))
    nwin = m["tokens_evaluated"] // 256
    targets = stream[: nwin * 257].view(nwin, 257)[:, 1:].flatten()
    uni = unigram_loss(token_stream(tok, corpus_texts("train")), targets, net.cfg.vocab_size)
    # 2 nats below: the model gives the held-out tokens e^2 = 7.4x the unigram's probability on
    # average (random weights score above the unigram, ~ln(vocab))
    assert m["loss_sparse"] < uni - 2.0, (m["loss_sparse"], uni)
    assert m["mtp_loss"] < uni - 1.5, (m["mtp_loss"], uni)  # the MTP layer predicts t + 2 as well


def _compiling_lines(text: str) -> int:
    """The most whole lines from the start of `text` (its last, maybe cut, line left out) that compile."""
    lines = text.split("\n")[:-1]
    for n in range(len(lines), 0, -1):
        try:
            compile("\n".join(lines[:n]) + "\n", "<completion>", "exec")
            return n
        except SyntaxError:
            continue
    return 0


def test_greedy_completion_of_a_function_is_python(net: torch.nn.Module) -> None:
    """Greedy decoding (with MTP drafts, lossless) continues `def fibonacci(n):` with an indented body:
    at least three lines from the start compile, and the text is printable ASCII."""
    tok = load_tokenizer(PATH)
    prompt = "def fibonacci(n):"
    ids = [BOS_TOKEN_ID] + tok.encode(prompt, add_special_tokens=False).ids
    eng = Engine(net, EngineConfig(num_blocks=16, block_size=64, mtp_draft_tokens=2))
    res = eng.generate([ids], SamplingParams(temperature=0.0, max_tokens=96))[0]
    text = prompt + tok.decode(res.token_ids)
    assert text.startswith(prompt + "\n    "), text  # an indented body follows the signature
    assert _compiling_lines(text) >= 3, text
    printable = sum(c.isascii() and (c.isprintable() or c in "\n\t") for c in text)
    assert printable >= 0.98 * len(text), text
    assert res.draft_tokens > 0 and res.accepted_draft_tokens > 0


def test_package_data_ships_every_checkpoint_file() -> None:
    """A non-editable install copies model/pycoder: pyproject's package-data globs cover each file."""
    import fnmatch
    import tomllib

    root = PATH.parents[1]
    data = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    globs = data["splitserve.model"]
    for f in PATH.iterdir():
        rel = f"{PATH.name}/{f.name}"
        assert any(fnmatch.fnmatch(rel, g) for g in globs), rel
