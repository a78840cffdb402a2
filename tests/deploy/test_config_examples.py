"""The example configs in deploy/ load, and local.yaml stays a complete, honest reference."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from splitserve.deploy.config import (
    DEFAULT_CONFIG_PATH,
    ClusterConfig,
    load_config,
    parse_config,
    with_overrides,
)

DEPLOY_DIR = Path(__file__).resolve().parents[2] / "deploy"
EXAMPLES = sorted(DEPLOY_DIR.glob("*.yaml"))


def _schema_paths(model: type[BaseModel], prefix: tuple[str, ...] = ()) -> set[tuple[str, ...]]:
    out: set[tuple[str, ...]] = set()
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out |= _schema_paths(ann, (*prefix, name))
        else:
            out.add((*prefix, name))
    return out


def _leaf_paths(doc: dict, prefix: tuple[str, ...] = ()) -> set[tuple[str, ...]]:
    out: set[tuple[str, ...]] = set()
    for key, value in doc.items():
        if isinstance(value, dict) and len(prefix) == 0:
            out |= _leaf_paths(value, (key,))
        else:
            out.add((*prefix, key))
    return out


def test_the_three_examples_exist() -> None:
    names = {p.name for p in EXAMPLES}
    assert {"local.yaml", "gpu-1node.yaml", "multinode.yaml"} <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_loads(path: Path) -> None:
    cfg = load_config(path)
    assert isinstance(cfg, ClusterConfig)
    # A loaded config is concrete: every pool knows its cache size.
    for pool in (cfg.prefill, cfg.decode):
        assert (pool.num_blocks is None) != (pool.cache_memory_fraction is None)
    # Dumping and parsing again gives the same config, and it pickles (the launcher ships it to Ray actors).
    assert parse_config(cfg.model_dump()) == cfg
    assert parse_config(json.loads(cfg.model_dump_json())) == cfg
    assert pickle.loads(pickle.dumps(cfg)) == cfg


def test_default_config_is_local_yaml_and_a_cpu_laptop_cluster() -> None:
    assert DEFAULT_CONFIG_PATH == DEPLOY_DIR / "local.yaml"
    cfg = load_config(DEFAULT_CONFIG_PATH)
    assert cfg.model.is_preset and cfg.model.served_name == "pycoder"  # the shipped trained model
    assert cfg.model.device == "cpu"
    assert (cfg.router.host, cfg.router.port) == ("127.0.0.1", 8000)
    assert cfg.prefill.replicas == 1 and cfg.decode.replicas == 1
    assert cfg.prefill.gpus_per_worker == 0 and cfg.decode.gpus_per_worker == 0
    assert cfg.transfer.backend == "nixl"
    assert cfg.ray.starts_local_cluster


def test_local_yaml_lists_every_schema_field() -> None:
    """local.yaml is the YAML reference: it must show every field, and nothing else."""
    doc = yaml.safe_load(DEFAULT_CONFIG_PATH.read_text())
    assert _leaf_paths(doc) == _schema_paths(ClusterConfig)


def test_local_yaml_values_are_the_schema_defaults() -> None:
    """The comments in local.yaml quote the defaults; the values shown must be them too
    (except where local.yaml deliberately differs, listed here)."""
    deliberate = {("decode", "mtp_draft_tokens"), ("model", "path")}
    doc = yaml.safe_load(DEFAULT_CONFIG_PATH.read_text())
    defaults = parse_config({}).model_dump()
    for section, key in _leaf_paths(doc) - deliberate:
        assert doc[section][key] == defaults[section][key], f"{section}.{key}"


def test_every_key_in_local_yaml_is_commented() -> None:
    """Each key has a comment on the line above or on its own line, except decode's pool fields,
    which the prefill section documents."""
    lines = DEFAULT_CONFIG_PATH.read_text().splitlines()
    section = None
    prefill_keys: set[str] = set()
    for i, line in enumerate(lines):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        key = stripped.split(":", 1)[0]
        if not line.startswith(" "):
            section = key
            continue
        if section == "prefill":
            prefill_keys.add(key)
        if section == "decode" and key in prefill_keys:
            continue
        documented = "#" in line or lines[i - 1].strip().startswith("#")
        assert documented, f"local.yaml line {i + 1}: {section}.{key} has no comment"


def test_gpu_1node_uses_gpus_and_nixl() -> None:
    cfg = load_config(DEPLOY_DIR / "gpu-1node.yaml")
    assert cfg.model.device == "cuda" and cfg.model.dtype == "bfloat16"
    assert cfg.prefill.gpus_per_worker >= 1 and cfg.decode.gpus_per_worker >= 1
    assert cfg.transfer.backend == "nixl"
    assert cfg.ray.starts_local_cluster
    assert cfg.router.api_key_env  # a network-facing router carries an API key


def test_gpu_1node_single_gpu_variant_from_its_comment() -> None:
    """The header of gpu-1node.yaml says how to run it on one GPU; that recipe must validate."""
    cfg = load_config(DEPLOY_DIR / "gpu-1node.yaml")
    shared = {"replicas": 1, "gpus_per_worker": 0.5, "num_blocks": 4096}
    one_gpu = with_overrides(cfg, prefill=shared, decode=shared)
    assert one_gpu.prefill.cache_memory_fraction is None and one_gpu.decode.num_blocks == 4096


def test_multinode_pins_pools_to_node_groups() -> None:
    cfg = load_config(DEPLOY_DIR / "multinode.yaml")
    assert not cfg.ray.starts_local_cluster
    assert cfg.prefill.resources and cfg.decode.resources
    # The pools ask for disjoint custom resources, so Ray cannot mix them on one node group.
    assert not set(cfg.prefill.resources) & set(cfg.decode.resources)
    assert cfg.prefill.grpc_host == "0.0.0.0" and cfg.decode.grpc_host == "0.0.0.0"
