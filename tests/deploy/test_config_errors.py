"""Specific ConfigError messages: each names the field's dotted path, the bad value, and what is allowed."""

from __future__ import annotations

from pathlib import Path

import pydantic
import pytest

from splitserve.deploy.config import (
    ClusterConfig,
    ConfigError,
    load_config,
    parse_config,
    with_overrides,
)


def _error(data: object) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_config(data)  # type: ignore[arg-type]
    return info.value


def _write(tmp_path: Path, text: str, name: str = "cluster.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# ----------------------------------------------------------------------------- field errors


def test_out_of_range_names_path_value_and_range() -> None:
    err = _error({"decode": {"mtp_draft_tokens": 12}})
    (problem,) = err.problems
    assert problem.path == "decode.mtp_draft_tokens"
    assert "got 12" in problem.message
    assert "[0, 8]" in problem.message
    assert "decode.mtp_draft_tokens" in str(err)


def test_wrong_type_names_the_type() -> None:
    err = _error({"router": {"port": "8000"}})
    (problem,) = err.problems
    assert problem.path == "router.port"
    assert "got '8000'" in problem.message and "a string" in problem.message
    assert "[0, 65535]" in problem.message


def test_bool_is_not_an_integer() -> None:
    err = _error({"prefill": {"replicas": True}})
    assert [p.path for p in err.problems] == ["prefill.replicas"]


def test_choice_lists_the_allowed_values() -> None:
    err = _error({"model": {"dtype": "int8"}})
    (problem,) = err.problems
    assert problem.path == "model.dtype"
    for choice in ("'float32'", "'bfloat16'", "'float16'"):
        assert choice in problem.message


def test_unknown_key_suggests_the_close_one() -> None:
    err = _error({"router": {"polcy": "round_robin"}})
    (problem,) = err.problems
    assert problem.path == "router.polcy"
    assert "unknown key" in problem.message
    assert "did you mean 'policy'?" in problem.message


def test_unknown_section_suggests_the_close_one() -> None:
    err = _error({"prefil": {"replicas": 2}})
    (problem,) = err.problems
    assert problem.path == "prefil"
    assert "did you mean 'prefill'?" in problem.message


def test_unknown_key_without_a_close_match_lists_the_valid_keys() -> None:
    err = _error({"transfer": {"zzzz": 1}})
    (problem,) = err.problems
    assert "did you mean" not in problem.message
    assert "backend" in problem.message and "timeout_s" in problem.message


def test_pool_specific_settings_say_which_pool() -> None:
    err = _error({"prefill": {"mtp_draft_tokens": 1}})
    assert [p.path for p in err.problems] == ["prefill.mtp_draft_tokens"]
    assert "mtp_draft_tokens is a decode-only setting" in err.problems[0].message


def test_all_problems_are_listed_at_once() -> None:
    err = _error(
        {
            "model": {"dtype": "int8"},
            "router": {"port": 70000, "polcy": "x"},
            "decode": {"mtp_draft_tokens": -1, "block_size": 48},
            "transfer": {"backend": "rdma"},
        }
    )
    paths = {p.path for p in err.problems}
    assert paths == {
        "model.dtype",
        "router.port",
        "router.polcy",
        "decode.mtp_draft_tokens",
        "decode.block_size",
        "transfer.backend",
    }
    assert "6 problems" in str(err)


def test_block_size_must_be_a_power_of_two() -> None:
    err = _error({"prefill": {"block_size": 48}})
    (problem,) = err.problems
    assert problem.path == "prefill.block_size"
    assert "power of two" in problem.message and "got 48" in problem.message


def test_non_finite_numbers_are_rejected() -> None:
    err = _error({"transfer": {"timeout_s": float("inf")}})
    assert [p.path for p in err.problems] == ["transfer.timeout_s"]


def test_custom_resources_cannot_be_gpu() -> None:
    err = _error({"prefill": {"resources": {"GPU": 1}}})
    (problem,) = err.problems
    assert problem.path == "prefill.resources" and "gpus_per_worker" in problem.message


def test_resource_amounts_must_be_positive() -> None:
    err = _error({"decode": {"resources": {"decode_node": 0}}})
    assert [p.path for p in err.problems] == ["decode.resources.decode_node"]


@pytest.mark.parametrize("address", ["", "nohost", "head:0", "head:70000", "http://head:6379"])
def test_bad_ray_address(address: str) -> None:
    err = _error({"ray": {"address": address}})
    (problem,) = err.problems
    assert problem.path == "ray.address" and "'auto'" in problem.message


@pytest.mark.parametrize("address", [None, "auto", "head:6379", "10.0.0.1:6379", "ray://head:10001", "[::1]:6379"])
def test_good_ray_address(address: str | None) -> None:
    assert parse_config({"ray": {"address": address}}).ray.address == address


def test_api_key_value_is_never_echoed() -> None:
    err = _error({"router": {"api_key": "", "polcy": 1}})
    assert "router.api_key" in str(err)
    cfg = parse_config({"router": {"api_key": "s3cret-value"}})
    assert "s3cret-value" not in repr(cfg)
    err = _error({"router": {"api_key": "s3cret-value", "api_key_env": "KEY"}})
    assert "s3cret-value" not in str(err)


def test_top_level_must_be_a_mapping() -> None:
    err = _error([1, 2])
    assert "top level must be a mapping" in str(err)


# ----------------------------------------------------------------------------- cross-field rules


def test_cpu_pools_take_no_gpus() -> None:
    err = _error({"model": {"device": "cpu"}, "decode": {"gpus_per_worker": 1}})
    (problem,) = err.problems
    assert problem.path == "decode.gpus_per_worker"
    assert "'cpu'" in problem.message and "got 1" in problem.message


def test_cuda_pools_need_gpus() -> None:
    err = _error({"model": {"device": "cuda"}, "prefill": {"gpus_per_worker": 0}})
    assert [p.path for p in err.problems] == ["prefill.gpus_per_worker"]


def test_fractional_gpus_above_one_must_be_whole() -> None:
    err = _error({"model": {"device": "cuda"}, "prefill": {"gpus_per_worker": 1.5}})
    assert [p.path for p in err.problems] == ["prefill.gpus_per_worker"]
    cfg = parse_config({"model": {"device": "cuda"}, "prefill": {"gpus_per_worker": 0.5, "num_blocks": 1000}})
    assert cfg.prefill.gpus_per_worker == 0.5


def test_tensor_parallel_size_range_and_its_gpus() -> None:
    err = _error({"decode": {"tensor_parallel_size": 0}})
    (problem,) = err.problems
    assert problem.path == "decode.tensor_parallel_size" and "got 0" in problem.message
    # cuda: one GPU per rank, the default follows the size; anything else names both fields
    cfg = parse_config({"model": {"device": "cuda"}, "prefill": {"tensor_parallel_size": 8}})
    assert (cfg.prefill.tensor_parallel_size, cfg.prefill.gpus_per_worker) == (8, 8)
    assert cfg.decode.gpus_per_worker == 1
    err = _error({"model": {"device": "cuda"}, "decode": {"tensor_parallel_size": 4, "gpus_per_worker": 1}})
    (problem,) = err.problems
    assert problem.path == "decode.gpus_per_worker"
    assert "tensor_parallel_size is 4" in problem.message and "allowed: 4" in problem.message
    # cpu: N processes, no GPUs
    cfg = parse_config({"decode": {"tensor_parallel_size": 2}})
    assert (cfg.decode.tensor_parallel_size, cfg.decode.gpus_per_worker) == (2, 0)


def test_expert_parallel_needs_several_ranks() -> None:
    err = _error({"prefill": {"expert_parallel": True}})
    (problem,) = err.problems
    assert problem.path == "prefill.expert_parallel"
    assert "tensor_parallel_size is 1" in problem.message and "tensor_parallel_size >= 2" in problem.message
    cfg = parse_config({"prefill": {"expert_parallel": True, "tensor_parallel_size": 2}})
    assert cfg.prefill.expert_parallel and not cfg.decode.expert_parallel


def test_gpu_memory_gb_is_positive_or_null() -> None:
    err = _error({"decode": {"gpu_memory_gb": 0}})
    (problem,) = err.problems
    assert problem.path == "decode.gpu_memory_gb" and "got 0" in problem.message and "or null" in problem.message
    assert parse_config({"decode": {"gpu_memory_gb": 141}}).decode.gpu_memory_gb == 141
    assert parse_config({}).decode.gpu_memory_gb is None


def test_shared_gpu_cache_is_sized_in_blocks() -> None:
    err = _error({"model": {"device": "cuda"}, "decode": {"gpus_per_worker": 0.5}})
    (problem,) = err.problems
    assert problem.path == "decode.cache_memory_fraction" and "decode.num_blocks" in problem.message


def test_block_sizes_must_match() -> None:
    err = _error({"prefill": {"block_size": 64}, "decode": {"block_size": 32}})
    (problem,) = err.problems
    assert problem.path == "decode.block_size" and "prefill.block_size" in problem.message


def test_cache_sized_one_way_only() -> None:
    err = _error({"model": {"device": "cuda"}, "decode": {"num_blocks": 100, "cache_memory_fraction": 0.5}})
    assert [p.path for p in err.problems] == ["decode.cache_memory_fraction"]


def test_memory_fraction_is_cuda_only() -> None:
    err = _error({"prefill": {"cache_memory_fraction": 0.5}})
    (problem,) = err.problems
    assert problem.path == "prefill.cache_memory_fraction" and "num_blocks" in problem.message


def test_cache_must_hold_max_model_len() -> None:
    err = _error(
        {
            "model": {"max_model_len": 4096},
            "decode": {"num_blocks": 10, "block_size": 64},
            "prefill": {"block_size": 64},
        }
    )
    (problem,) = err.problems
    assert problem.path == "decode.num_blocks"
    assert "640" in problem.message and "4096" in problem.message and ">= 64" in problem.message


def test_chunk_size_within_batch_budget() -> None:
    err = _error({"prefill": {"chunk_size": 4096, "max_batch_tokens": 1024}})
    assert [p.path for p in err.problems] == ["prefill.chunk_size"]


def test_decode_chunk_size_within_batch_budget_and_its_default() -> None:
    err = _error({"decode": {"chunk_size": 4096, "max_batch_tokens": 1024}})
    (problem,) = err.problems
    assert problem.path == "decode.chunk_size" and "max_batch_tokens (1024)" in problem.message
    assert parse_config({}).decode.effective_chunk_size == 512
    assert parse_config({"decode": {"max_batch_tokens": 100}}).decode.effective_chunk_size == 100
    assert parse_config({"decode": {"chunk_size": 2048}}).decode.effective_chunk_size == 2048


def test_colocated_mode_has_no_prefill_pool() -> None:
    cfg = parse_config({"router": {"mode": "colocated"}, "decode": {"replicas": 2}})
    assert cfg.prefill.replicas == 0 and cfg.decode.replicas == 2
    assert parse_config(cfg.model_dump()) == cfg
    assert with_overrides(cfg, decode=3).decode.replicas == 3
    # the prefill section is unused there: its block size need not match, nor its settings fit the device
    parse_config({"router": {"mode": "colocated"}, "prefill": {"block_size": 16, "replicas": 0}})
    err = _error({"router": {"mode": "colocated"}, "prefill": {"replicas": 2}})
    (problem,) = err.problems
    assert problem.path == "prefill.replicas" and "got 2" in problem.message and "colocated" in problem.message
    with pytest.raises(ConfigError, match="prefill.replicas"):
        with_overrides(cfg, prefill=1)


def test_disaggregated_mode_needs_prefill_workers() -> None:
    err = _error({"prefill": {"replicas": 0}})
    (problem,) = err.problems
    assert problem.path == "prefill.replicas" and "got 0" in problem.message
    assert "router.mode: colocated" in problem.message
    err = _error({"router": {"mode": "co-located"}})
    (problem,) = err.problems
    assert problem.path == "router.mode" and "'disaggregated', 'colocated'" in problem.message


def test_decode_budget_fits_one_request_with_drafts() -> None:
    err = _error({"decode": {"mtp_draft_tokens": 3, "max_batch_tokens": 3}})
    (problem,) = err.problems
    assert problem.path == "decode.max_batch_tokens" and ">= 4" in problem.message


def test_api_key_sources_are_exclusive() -> None:
    err = _error({"router": {"api_key": "k", "api_key_env": "KEY"}})
    assert [p.path for p in err.problems] == ["router.api_key_env"]


def test_cpus_per_worker_defaults_by_device_and_must_be_positive() -> None:
    assert parse_config({}).decode.cpus_per_worker == 0.25  # a CPU worker shares a core
    cuda = parse_config({"model": {"device": "cuda"}})
    assert cuda.prefill.cpus_per_worker == cuda.decode.cpus_per_worker == 1.0
    assert parse_config({"decode": {"cpus_per_worker": 2}}).decode.cpus_per_worker == 2
    err = _error({"decode": {"cpus_per_worker": 0}})
    assert [p.path for p in err.problems] == ["decode.cpus_per_worker"] and "got 0" in str(err)


def test_grpc_tls_files_are_all_or_none_and_must_be_readable(tmp_path: Path) -> None:
    from splitserve.deploy.worker_actor import load_grpc_tls

    assert not parse_config({}).security.uses_tls and load_grpc_tls(parse_config({})) is None
    err = _error({"security": {"grpc_tls_cert": "w.pem"}})
    assert sorted(p.path for p in err.problems) == ["security.grpc_tls_ca", "security.grpc_tls_key"]
    err = _error({"security": {"grpc_tls_server_name": "w"}})
    assert [p.path for p in err.problems] == ["security.grpc_tls_server_name"]
    for name in ("w.pem", "k.pem"):
        (tmp_path / name).write_bytes(b"PEM " + name.encode())
    cfg = parse_config(
        {"security": {"grpc_tls_cert": "w.pem", "grpc_tls_key": "k.pem", "grpc_tls_ca": "w.pem"}}, base_dir=tmp_path
    )
    tls = load_grpc_tls(cfg)
    assert tls is not None and tls.cert == tls.ca == b"PEM w.pem" and tls.key == b"PEM k.pem"
    cfg = parse_config(
        {"security": {"grpc_tls_cert": "w.pem", "grpc_tls_key": "missing.pem", "grpc_tls_ca": "w.pem"}},
        base_dir=tmp_path,
    )
    with pytest.raises(ConfigError, match="security.grpc_tls_key.*missing.pem"):
        load_grpc_tls(cfg)


def test_num_cpus_only_for_a_local_cluster() -> None:
    err = _error({"ray": {"address": "auto", "num_cpus": 4}})
    assert [p.path for p in err.problems] == ["ray.num_cpus"]


# ----------------------------------------------------------------------------- defaults and helpers


def test_device_dependent_defaults() -> None:
    cpu = parse_config({})
    assert cpu.model.dtype == "float32"
    assert cpu.prefill.gpus_per_worker == 0 and cpu.prefill.num_blocks == 512
    assert cpu.prefill.cache_memory_fraction is None
    cuda = parse_config({"model": {"device": "cuda"}})
    assert cuda.model.dtype == "bfloat16"
    assert cuda.decode.gpus_per_worker == 1 and cuda.decode.cache_memory_fraction == 0.9
    assert cuda.decode.num_blocks is None
    explicit = parse_config({"model": {"device": "cuda", "dtype": "float16"}, "decode": {"num_blocks": 100}})
    assert explicit.model.dtype == "float16"
    assert explicit.decode.num_blocks == 100 and explicit.decode.cache_memory_fraction is None


def test_empty_document_and_empty_sections_mean_defaults() -> None:
    assert parse_config(None) == parse_config({}) == parse_config({"router": None, "ray": None})


def test_config_is_frozen() -> None:
    cfg = parse_config({})
    with pytest.raises(pydantic.ValidationError):
        cfg.router.port = 1  # type: ignore[misc]


def test_resolve_api_key_from_environment() -> None:
    cfg = parse_config({"router": {"api_key_env": "SPLITSERVE_TEST_KEY"}})
    assert cfg.router.resolve_api_key({"SPLITSERVE_TEST_KEY": "abc"}) == "abc"
    with pytest.raises(ConfigError, match="router.api_key_env"):
        cfg.router.resolve_api_key({})
    assert parse_config({"router": {"api_key": "k"}}).router.resolve_api_key({}) == "k"
    assert parse_config({}).router.resolve_api_key({}) is None


def test_with_overrides() -> None:
    cfg = parse_config({})
    new = with_overrides(cfg, port=9000, prefill=2, decode={"replicas": 3, "mtp_draft_tokens": 2})
    assert new.router.port == 9000
    assert new.prefill.replicas == 2 and new.decode.replicas == 3 and new.decode.mtp_draft_tokens == 2
    assert cfg.router.port == 8000  # the original is untouched
    assert with_overrides(cfg) == cfg


def test_with_overrides_validates() -> None:
    cfg = parse_config({})
    with pytest.raises(ConfigError) as info:
        with_overrides(cfg, decode=0)
    assert [p.path for p in info.value.problems] == ["decode.replicas"]
    with pytest.raises(ConfigError) as info:
        with_overrides(cfg, port=-1, prefill={"replica": 2})
    assert {p.path for p in info.value.problems} == {"router.port", "prefill.replica"}
    assert "did you mean 'replicas'?" in str(info.value)


def test_with_overrides_switches_cache_sizing() -> None:
    cfg = parse_config({"model": {"device": "cuda"}})
    new = with_overrides(cfg, decode={"num_blocks": 1000})
    assert new.decode.num_blocks == 1000 and new.decode.cache_memory_fraction is None


def test_direct_construction_validates_too() -> None:
    with pytest.raises(pydantic.ValidationError):
        ClusterConfig.model_validate({"decode": {"block_size": 32}})


# ----------------------------------------------------------------------------- files


def test_yaml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    path = _write(tmp_path, "model:\n  path: tiny\nrouter:\n  port: [8000\n  host: x\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    text = str(info.value)
    assert str(path) in text
    assert "line 5" in text or "line 4" in text
    assert "invalid YAML" in text


def test_yaml_tab_indentation_error_names_line(tmp_path: Path) -> None:
    path = _write(tmp_path, "router:\n  port: 8000\n\thost: x\n")
    with pytest.raises(ConfigError, match=r"line 3") as info:
        load_config(path)
    assert str(path) in str(info.value)


def test_duplicate_keys_are_errors(tmp_path: Path) -> None:
    path = _write(tmp_path, "router:\n  port: 8000\n  port: 9000\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    text = str(info.value)
    assert "duplicate key 'port'" in text and "line 3" in text and "line 2" in text


def test_validation_errors_carry_file_lines(tmp_path: Path) -> None:
    path = _write(tmp_path, "model:\n  path: tiny\ndecode:\n  replicas: 1\n  mtp_draft_tokens: 12\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    (problem,) = info.value.problems
    assert problem.path == "decode.mtp_draft_tokens" and problem.line == 5
    assert str(path) in str(info.value) and "(line 5)" in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "nope.yaml")


def test_empty_file_is_the_default_cluster(tmp_path: Path) -> None:
    assert load_config(_write(tmp_path, "# nothing\n")) == parse_config({})


def test_top_level_scalar_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(_write(tmp_path, "just a string\n"))


def test_relative_model_path_resolves_against_the_file(tmp_path: Path) -> None:
    (tmp_path / "conf").mkdir()
    path = _write(tmp_path / "conf", "model:\n  path: ../ckpt/v32\n")
    cfg = load_config(path)
    assert Path(cfg.model.path) == (tmp_path / "conf" / ".." / "ckpt" / "v32")
    assert Path(cfg.model.path).is_absolute()
    assert cfg.model.served_name == "v32"
    assert load_config(_write(tmp_path, "model:\n  path: tiny\n", "t.yaml")).model.path == "tiny"
