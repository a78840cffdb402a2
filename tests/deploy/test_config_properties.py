"""Property tests over generated config documents.

Valid documents (built to satisfy every rule the schema states) load, keep their values, and
survive a dump/parse round trip. A valid document with one defect injected — a wrong type, an
out-of-range value, an unknown key — raises ConfigError naming the defective field's path, and
never any other exception. Arbitrary junk raises ConfigError or loads, nothing else.
"""

from __future__ import annotations

import copy
import string
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from splitserve.deploy.config import (
    ClusterConfig,
    ConfigError,
    DecodePoolConfig,
    ModelConfig,
    PrefillPoolConfig,
    RayConfig,
    RouterConfig,
    TransferConfig,
    parse_config,
    with_overrides,
)

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

SECTION_MODELS = {
    "model": ModelConfig,
    "router": RouterConfig,
    "prefill": PrefillPoolConfig,
    "decode": DecodePoolConfig,
    "transfer": TransferConfig,
    "ray": RayConfig,
}

# ----------------------------------------------------------------------------- valid documents

hosts = st.sampled_from(["127.0.0.1", "0.0.0.0", "localhost", "::1", "node-3.cluster.local"])
seconds = st.one_of(st.floats(min_value=0.001, max_value=86400.0, allow_nan=False), st.integers(1, 86400))
names = st.text(string.ascii_letters + string.digits + "_-", min_size=1, max_size=12)


def _maybe(draw: st.DrawFn, out: dict[str, Any], key: str, strategy: st.SearchStrategy[Any]) -> None:
    """Set `key` from `strategy` or leave it out (so defaults are exercised too)."""
    if draw(st.booleans()):
        out[key] = draw(strategy)


@st.composite
def valid_configs(draw: st.DrawFn) -> dict[str, Any]:
    device = draw(st.sampled_from(["cpu", "cuda"]))
    block_size = draw(st.sampled_from([1, 2, 16, 64, 128, 1024]))
    doc: dict[str, Any] = {}

    model: dict[str, Any] = {"device": device} if device == "cuda" or draw(st.booleans()) else {}
    _maybe(draw, model, "path", st.sampled_from(["tiny", "/models/DeepSeek-V3.2-Exp", "/ckpt/x"]))
    _maybe(draw, model, "name", st.one_of(st.none(), names))
    _maybe(draw, model, "dtype", st.sampled_from(["float32", "bfloat16", "float16"]))
    _maybe(draw, model, "indexer_fp8", st.booleans())

    pools: dict[str, dict[str, Any]] = {}
    for pool in ("prefill", "decode"):
        p: dict[str, Any] = {"block_size": block_size} if draw(st.booleans()) or block_size != 64 else {}
        _maybe(draw, p, "replicas", st.integers(1, 64))
        if device == "cuda":
            _maybe(draw, p, "gpus_per_worker", st.sampled_from([0.25, 0.5, 1, 2, 8, 2.0]))
            shared = p.get("gpus_per_worker", 1) < 1  # a shared GPU is sized in blocks
            sizing = "blocks" if shared else draw(st.sampled_from(["none", "blocks", "fraction"]))
            if sizing == "fraction":
                p["cache_memory_fraction"] = draw(st.floats(min_value=0.01, max_value=1.0))
        else:
            _maybe(draw, p, "gpus_per_worker", st.just(0))
            sizing = draw(st.sampled_from(["none", "blocks"]))
        if sizing == "blocks":
            p["num_blocks"] = draw(st.integers(1, 100_000))
        mbt = draw(st.integers(16, 65536))
        _maybe(draw, p, "max_batch_tokens", st.just(mbt))
        _maybe(draw, p, "max_running_requests", st.integers(1, 4096))
        _maybe(
            draw,
            p,
            "resources",
            st.dictionaries(
                names.filter(lambda n: n not in ("CPU", "GPU", "memory")),
                st.floats(min_value=0.001, max_value=64),
                max_size=3,
            ),
        )
        _maybe(draw, p, "grpc_host", hosts)
        budget = p.get("max_batch_tokens", 8192)
        if pool == "prefill":
            p["chunk_size"] = draw(st.integers(1, budget)) if draw(st.booleans()) else min(2048, budget)
            if p["chunk_size"] == 2048 and "max_batch_tokens" not in p and draw(st.booleans()):
                del p["chunk_size"]
        else:
            _maybe(draw, p, "mtp_draft_tokens", st.integers(0, min(8, budget - 1)))
        pools[pool] = p
    # max_model_len must fit every pool whose cache is sized in blocks.
    caps = [
        (p["num_blocks"] if "num_blocks" in p else 512) * block_size
        for p in pools.values()
        if "cache_memory_fraction" not in p and ("num_blocks" in p or device == "cpu")
    ]
    _maybe(draw, model, "max_model_len", st.one_of(st.none(), st.integers(1, min([*caps, 2**31 - 1]))))

    router: dict[str, Any] = {}
    _maybe(draw, router, "host", hosts)
    _maybe(draw, router, "port", st.integers(0, 65535))
    _maybe(draw, router, "policy", st.sampled_from(["least_loaded", "round_robin", "prefix_affinity"]))
    _maybe(draw, router, "max_queued", st.integers(1, 10**6))
    key_source = draw(st.sampled_from(["none", "key", "env"]))
    if key_source == "key":
        router["api_key"] = draw(st.text(min_size=1, max_size=20))
    elif key_source == "env":
        router["api_key_env"] = draw(st.from_regex(r"[A-Z_][A-Z0-9_]{0,10}", fullmatch=True))
    for key in ("reserve_timeout_s", "first_token_timeout_s", "idle_stream_timeout_s"):
        _maybe(draw, router, key, seconds)
    _maybe(draw, router, "max_body_bytes", st.integers(1024, 2**40))

    transfer: dict[str, Any] = {}
    _maybe(draw, transfer, "backend", st.sampled_from(["nixl", "tcp"]))
    _maybe(draw, transfer, "timeout_s", seconds)
    _maybe(draw, transfer, "host", hosts)
    _maybe(draw, transfer, "interface", st.one_of(st.none(), st.sampled_from(["eth0", "mlx5_0:1"])))

    ray: dict[str, Any] = {}
    _maybe(draw, ray, "address", st.sampled_from([None, "auto", "head:6379", "10.1.2.3:6379", "ray://head:10001"]))
    _maybe(draw, ray, "namespace", names)
    if ray.get("address") is None:
        _maybe(draw, ray, "num_cpus", st.one_of(st.none(), st.integers(1, 256)))

    for section, value in (("model", model), ("router", router), ("transfer", transfer), ("ray", ray), *pools.items()):
        if value or draw(st.booleans()):
            doc[section] = value
    return doc


@SETTINGS
@given(valid_configs())
def test_valid_documents_load_and_keep_their_values(doc: dict[str, Any]) -> None:
    original = copy.deepcopy(doc)
    cfg = parse_config(doc)
    assert doc == original  # the input is not modified
    for section, fields in doc.items():
        for key, value in fields.items():
            got = getattr(getattr(cfg, section), key)
            assert got == value, f"{section}.{key}: {got!r} != {value!r}"
    assert parse_config(cfg.model_dump()) == cfg
    assert with_overrides(cfg) == cfg


# ----------------------------------------------------------------------------- one defect

WRONG_TYPES: dict[str, list[Any]] = {
    "int": ["8", 1.5, 2.0, True, [1], {"a": 1}],
    "float": ["0.5", True, [1.0], {"x": 1}],
    "bool": [1, "yes", 0.0, [True]],
    "str": [5, 1.5, True, ["a"], {"a": "b"}],
    "choice": [5, True, ["cpu"], None],
    "dict": [[1], "a", 5, True],
    "section": [5, "x", [1], True],
}

# path -> (kind, out-of-range or otherwise invalid values of the right type)
FIELDS: dict[str, tuple[str, list[Any]]] = {
    "model": ("section", []),
    "model.path": ("str", [""]),
    "model.name": ("str", [""]),
    "model.dtype": ("choice", ["int8", "fp8", "FLOAT32", ""]),
    "model.device": ("choice", ["tpu", "gpu", "CPU"]),
    "model.indexer_fp8": ("bool", []),
    "model.max_model_len": ("int", [0, -1, 2**31]),
    "router": ("section", []),
    "router.host": ("str", ["", "a b", "http://x"]),
    "router.port": ("int", [-1, 65536, 10**9]),
    "router.policy": ("choice", ["random", "LEAST_LOADED"]),
    "router.max_queued": ("int", [0, -1]),
    "router.api_key": ("str", [""]),
    "router.api_key_env": ("str", ["", "1BAD", "has space", "A-B"]),
    "router.reserve_timeout_s": ("float", [0, -1.0, 1e9, float("nan"), float("inf")]),
    "router.first_token_timeout_s": ("float", [0.0, -0.5]),
    "router.idle_stream_timeout_s": ("float", [0, 86400.5]),
    "router.max_body_bytes": ("int", [0, 1023]),
    "transfer": ("section", []),
    "transfer.backend": ("choice", ["rdma", "NIXL", "ucx"]),
    "transfer.timeout_s": ("float", [0, -3, float("-inf")]),
    "transfer.host": ("str", ["", "two words"]),
    "transfer.interface": ("str", [""]),
    "ray": ("section", []),
    "ray.address": ("str", ["", "head", "head:0", "head:65536", "http://head:1", "ray://head"]),
    "ray.namespace": ("str", [""]),
    "ray.num_cpus": ("int", [0, -2]),
}
for _pool in ("prefill", "decode"):
    FIELDS.update(
        {
            _pool: ("section", []),
            f"{_pool}.replicas": ("int", [0, -1]),
            f"{_pool}.gpus_per_worker": ("float", [-1, -0.5, 1.5, 2.25]),
            f"{_pool}.num_blocks": ("int", [0, -5, 2**31]),
            f"{_pool}.cache_memory_fraction": ("float", [0, 1.01, -0.1]),
            f"{_pool}.block_size": ("int", [0, 3, 48, 100, 2048, -64]),
            f"{_pool}.max_batch_tokens": ("int", [0, -1]),
            f"{_pool}.max_running_requests": ("int", [0]),
            f"{_pool}.resources": ("dict", [{"GPU": 1}, {"CPU": 2}, {"x": 0}, {"x": -1}, {"x": "1"}, {"": 1}]),
            f"{_pool}.grpc_host": ("str", ["", "a\tb"]),
        }
    )
FIELDS["prefill.chunk_size"] = ("int", [0, -1])
FIELDS["decode.chunk_size"] = ("int", [0, -1])
FIELDS["router.mode"] = ("choice", ["both", "COLOCATED", "disagg"])
FIELDS["decode.mtp_draft_tokens"] = ("int", [-1, 9, 100])


def _set(doc: dict[str, Any], path: str, value: Any) -> None:
    parts = path.split(".")
    target = doc
    for part in parts[:-1]:
        if not isinstance(target.get(part), dict):
            target[part] = {}
        target = target[part]
    target[parts[-1]] = value


@st.composite
def broken_configs(draw: st.DrawFn) -> tuple[dict[str, Any], str]:
    """A valid document with one defect, and the dotted path an error must name."""
    doc = draw(valid_configs())
    defect = draw(st.sampled_from(["wrong_type", "out_of_range", "unknown_key"]))
    if defect == "unknown_key":
        section = draw(st.sampled_from([None, *SECTION_MODELS]))
        known = set(ClusterConfig.model_fields) if section is None else set(SECTION_MODELS[section].model_fields)
        # any other pool's field counts as known (the error then says which pool it belongs to)
        known |= set(PrefillPoolConfig.model_fields) | set(DecodePoolConfig.model_fields)
        key = draw(st.text(string.ascii_lowercase + "_", min_size=1, max_size=16).filter(lambda k: k not in known))
        value = draw(st.one_of(st.integers(), st.text(max_size=5), st.none()))
        path = key if section is None else f"{section}.{key}"
        _set(doc, path, value)
        return doc, path
    path = draw(st.sampled_from(sorted(FIELDS)))
    kind, bad_values = FIELDS[path]
    if defect == "out_of_range" and bad_values:
        value = draw(st.sampled_from(bad_values))
    else:
        value = draw(st.sampled_from(WRONG_TYPES[kind]))
    _set(doc, path, value)
    return doc, path


@SETTINGS
@given(broken_configs())
def test_one_defect_is_reported_by_path(case: tuple[dict[str, Any], str]) -> None:
    doc, path = case
    try:
        cfg = parse_config(doc)
    except ConfigError as err:
        paths = [p.path for p in err.problems]
        assert any(p == path or p.startswith(path + ".") for p in paths), (path, str(err))
        assert path in str(err)
        for problem in err.problems:
            assert problem.message and "\n" not in problem.message
    else:
        raise AssertionError(f"accepted an invalid value at {path}: {cfg}")


# ----------------------------------------------------------------------------- junk

json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=8)),
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(
            st.one_of(st.text(max_size=8), st.sampled_from(["device", "replicas", "port"])), children, max_size=4
        ),
    ),
    max_leaves=20,
)


@st.composite
def junk_documents(draw: st.DrawFn) -> Any:
    if draw(st.booleans()):
        return draw(json_values)
    keys = st.sampled_from([*SECTION_MODELS, "other"])
    doc: dict[Any, Any] = draw(st.dictionaries(keys, json_values, max_size=6))
    # Sometimes a real section with junk fields inside.
    section = draw(st.sampled_from(list(SECTION_MODELS)))
    fields = list(SECTION_MODELS[section].model_fields)
    doc[section] = draw(st.dictionaries(st.sampled_from(fields), json_values, max_size=4))
    return doc


@SETTINGS
@given(junk_documents())
def test_junk_raises_config_error_and_nothing_else(doc: Any) -> None:
    try:
        cfg = parse_config(doc)
    except ConfigError as err:
        assert err.problems
        assert str(err).startswith("invalid cluster config")
    else:
        assert isinstance(cfg, ClusterConfig)
