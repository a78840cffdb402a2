"""Engine test fixtures: the tiny network, and a 'predictable' variant whose MTP layer agrees with
the main model often (so speculative decoding accepts drafts and the rollback paths run)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from splitserve.model import DeepseekV32, load
from splitserve.tests.tp_workers import make_predictable


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Tiny tensors: intra-op threads only add synchronisation (and stall badly when other test
    processes share the cores). For a module: `pytestmark = pytest.mark.usefixtures("one_torch_thread")`;
    restored after it."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_net(tiny_checkpoint) -> DeepseekV32:
    return load(tiny_checkpoint, dtype=torch.float32)


@pytest.fixture(scope="session")
def predictable_net(tiny_checkpoint) -> DeepseekV32:
    """Main layers' residual branches scaled by 0.1 (the next token depends mostly, not only, on the
    current one) and an MTP layer whose eh_proj passes the embedding through: its draft for t+2 is
    the main model's bigram guess from t+1, right most of the time, wrong sometimes."""
    net = load(tiny_checkpoint, dtype=torch.float32)
    make_predictable(net)  # the same recipe the tensor-parallel tests apply to each rank's shard
    return net


def random_prompts(lengths: list[int], vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, vocab, (n,), generator=g).tolist() for n in lengths]


def greedy_reference(net: DeepseekV32, prompt: list[int], n: int) -> list[int]:
    """Greedy continuation by cache-free scoring of the whole sequence at every step."""
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(net.score(torch.tensor(ids))[-1].argmax()))
    return ids[len(prompt) :]
