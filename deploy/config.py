"""The cluster config: the schema of deploy/*.yaml, validated once, then frozen.

One YAML file describes a whole cluster. Its sections map to one frozen model each:

    model      the checkpoint and how to run it            -> ModelConfig
    router     the HTTP front end (OpenAI API)             -> RouterConfig
    prefill    the prefill worker pool                     -> PrefillPoolConfig
    decode     the decode worker pool                      -> DecodePoolConfig
    transfer   how cache blocks move prefill -> decode     -> TransferConfig
    ray        which Ray cluster to start or join          -> RayConfig
    security   TLS for the workers' gRPC (optional)        -> SecurityConfig

`load_config(path)` reads a YAML file, `parse_config(mapping)` validates a mapping that is already
loaded, `with_overrides(cfg, ...)` returns a re-validated copy with CLI overrides applied. All
three raise `ConfigError` and nothing else for a bad config: one message that lists every problem
with its dotted path (`decode.mtp_draft_tokens`), the value it got, what is allowed, and (for
files) the line. Unknown keys are errors, with a "did you mean" suggestion.

Defaults that depend on `model.device` are filled before validation, so a validated config is
always concrete:

    model.dtype                 float32 on cpu, bfloat16 on cuda
    <pool>.gpus_per_worker      0 on cpu, tensor_parallel_size on cuda (1 GPU per rank)
    <pool>.cpus_per_worker      0.25 on cpu, 1 on cuda
    <pool>.num_blocks           512 on cpu (when neither num_blocks nor cache_memory_fraction is set)
    <pool>.cache_memory_fraction 0.9 on cuda (when neither is set)

and one that depends on `router.mode`: prefill.replicas is 1 when disaggregated, 0 when colocated
(decode workers then prefill their own requests; there is no prefill pool).

deploy/local.yaml lists every field with its meaning; it is the YAML reference.
"""

from __future__ import annotations

import difflib
import logging
import os
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import annotated_types
import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "TINY_MODEL",
    "ClusterConfig",
    "ConfigError",
    "ConfigProblem",
    "DecodePoolConfig",
    "ModelConfig",
    "PoolConfig",
    "PrefillPoolConfig",
    "RayConfig",
    "RouterConfig",
    "SecurityConfig",
    "TransferConfig",
    "load_config",
    "parse_config",
    "with_overrides",
]

#: The embedded default cluster (model "tiny" on CPU, 1 prefill + 1 decode, router on :8000).
DEFAULT_CONFIG_PATH = Path(__file__).with_name("local.yaml")

#: `model.path` value naming the project's embedded tiny checkpoint (random weights, created on first run).
TINY_MODEL = "tiny"
#: `model.path` values naming a checkpoint by name (model/presets.py resolves them): the tiny one and the
#: trained ones shipped in the package (deploy/local.yaml serves "pycoder").
PRESET_MODELS = frozenset({TINY_MODEL, "pycoder"})

#: Largest block id / block count: block ids travel as int32 on the wire (protos/worker.proto).
_MAX_INT32 = 2**31 - 1
_MAX_BLOCK_SIZE = 1024
_MAX_MTP_DRAFT_TOKENS = 8
_MAX_TENSOR_PARALLEL = 1024
_CPU_DEFAULT_NUM_BLOCKS = 512
_CPU_DEFAULT_CPUS_PER_WORKER = 0.25
_DECODE_DEFAULT_CHUNK_SIZE = 512
_CUDA_DEFAULT_CACHE_MEMORY_FRACTION = 0.9
# Ray reserves these resource names; a pool asks for GPUs through gpus_per_worker instead.
_RAY_RESERVED_RESOURCES = frozenset({"CPU", "GPU", "memory", "object_store_memory"})
_SECTIONS = ("model", "router", "prefill", "decode", "transfer", "ray", "security")


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ConfigProblem:
    """One thing wrong with a config: where (dotted path, file line) and what."""

    path: str  # dotted field path, e.g. "decode.mtp_draft_tokens"; "" for the whole document
    message: str  # one line, without the path
    line: int | None = None  # 1-based line in the YAML file, where known

    def __str__(self) -> str:
        if not self.path:
            return self.message if self.line is None else f"line {self.line}: {self.message}"
        where = self.path if self.line is None else f"{self.path} (line {self.line})"
        return f"{where}: {self.message}"


class ConfigError(ValueError):
    """A cluster config is invalid. `problems` lists every problem found; str() renders them all."""

    def __init__(self, problems: list[ConfigProblem] | tuple[ConfigProblem, ...], source: str | None = None):
        self.problems: tuple[ConfigProblem, ...] = tuple(problems)
        self.source = source
        super().__init__(self._render())

    def _render(self) -> str:
        what = f"invalid cluster config {self.source}" if self.source else "invalid cluster config"
        n = len(self.problems)
        head = f"{what}: {n} problem{'s' if n != 1 else ''}"
        return "\n".join([head, *(f"  - {p}" for p in self.problems)])


class _CrossFieldError(ValueError):
    """Raised inside model validators for rules that involve several fields.

    Pydantic wraps it in a ValidationError at the model's location; `_problems_from_validation`
    unwraps it so each problem keeps its own field path, value and allowed values.
    """

    def __init__(self, problems: list[tuple[tuple[str, ...], Any, str, str]]):
        # (path relative to the raising model, value, reason, allowed)
        self.problems = problems
        super().__init__("; ".join(f"{'.'.join(p)}: {reason}" for p, _, reason, _ in problems))


@dataclass(frozen=True, slots=True)
class Allowed:
    """Annotated marker: the allowed values of a field, in words, for error messages."""

    text: str


# --------------------------------------------------------------------------------------------
# Small field validators
# --------------------------------------------------------------------------------------------

_HOST_RE = re.compile(r"^[A-Za-z0-9_.\-:\[\]%]+$")
_RAY_ADDRESS_RE = re.compile(r"^(ray://)?(\[[0-9A-Fa-f:.%]+\]|[A-Za-z0-9_.\-]+):(\d{1,5})$")


def _check_host(value: str) -> str:
    if not _HOST_RE.match(value):
        raise ValueError("not a hostname or IP address")
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


_STRICT = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

HostStr = typing.Annotated[str, Allowed("a hostname or IP address, e.g. 127.0.0.1 or 0.0.0.0")]
PositiveSeconds = typing.Annotated[float, Field(gt=0, le=86400.0), Allowed("a number of seconds in (0, 86400]")]


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


class ModelConfig(BaseModel):
    """The checkpoint and how to run it."""

    model_config = _STRICT

    # Checkpoint directory (HF layout: config.json, *.safetensors, tokenizer), or a preset name:
    # "pycoder" (the trained model shipped in the package) or "tiny" (the project's embedded tiny
    # random-weight checkpoint, created on first run). A relative path in a YAML file is resolved
    # against the file's directory; "~" is expanded.
    path: typing.Annotated[str, Field(min_length=1), Allowed("'pycoder', 'tiny' or a checkpoint directory")] = (
        TINY_MODEL
    )
    # The model name clients send in requests ("model": ...). None: the preset's name for a preset,
    # otherwise the checkpoint directory's name.
    name: typing.Annotated[str | None, Field(min_length=1)] = None
    # Activation / weight compute dtype (FP8 checkpoint weights dequantised when loaded land in it).
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: Literal["cpu", "cuda"] = "cpu"
    # Store and score the lightning indexer's keys in FP8 e4m3 (as DeepSeek-V3.2 does) instead of dtype.
    indexer_fp8: bool = False
    # Keep the MLA latent cache in FP8 (e4m3 + one fp32 scale per 128 values, rope in bf16: FlashMLA's
    # 656-byte token at full size) instead of in dtype.
    latent_fp8: bool = False
    # FP8 checkpoints: keep the quantised linear weights in e4m3 with their 128x128 block scales (true)
    # or dequantise them to dtype when loading (false). None: keep them on cuda, dequantise on cpu.
    fp8_weights: bool | None = None
    # Longest prompt + completion served, in tokens. None: the checkpoint's max_position_embeddings.
    max_model_len: typing.Annotated[int | None, Field(ge=1, le=_MAX_INT32)] = None

    @field_validator("path")
    @classmethod
    def _resolve_path(cls, value: str, info: ValidationInfo) -> str:
        if value in PRESET_MODELS:
            return value
        path = Path(value).expanduser()
        base = (info.context or {}).get("base_dir")
        if not path.is_absolute() and base is not None:
            path = Path(base) / path
        return str(path)

    @property
    def is_tiny(self) -> bool:
        return self.path == TINY_MODEL

    @property
    def is_preset(self) -> bool:
        """A checkpoint named by a preset (resolved where `up` runs: model/presets.py)."""
        return self.path in PRESET_MODELS

    @property
    def served_name(self) -> str:
        """The name clients put in the request's "model" field."""
        if self.name is not None:
            return self.name
        return self.path if self.is_preset else (Path(self.path).name or self.path)


class RouterConfig(BaseModel):
    """The HTTP front end: OpenAI-compatible API, admission, timeouts."""

    model_config = _STRICT

    host: HostStr = "127.0.0.1"
    # 0 picks a free port (tests); the router logs the one it bound.
    port: typing.Annotated[int, Field(ge=0, le=65535)] = 8000
    # disaggregated: prefill workers compute prompts and write their cache into a decode worker's blocks.
    # colocated: no prefill pool (prefill.replicas 0); each request runs whole on one decode worker, whose
    # engine prefills the prompt in chunks (decode.chunk_size) batched with its running decodes.
    mode: Literal["disaggregated", "colocated"] = "disaggregated"
    # How the router picks workers: least_loaded (free decode blocks, queued prefill tokens),
    # round_robin, or prefix_affinity (prefill worker most likely to hold the prompt's prefix).
    # In colocated mode the same policies pick the decode worker.
    policy: Literal["least_loaded", "round_robin", "prefix_affinity"] = "least_loaded"
    # Requests the router holds at once (streaming + waiting for decode space); beyond it, 429 at once.
    max_queued: typing.Annotated[int, Field(ge=1)] = 512
    # Bearer token clients must send. Prefer api_key_env (the name of an environment variable that
    # holds it) so the secret stays out of the file. At most one of the two.
    api_key: typing.Annotated[str | None, Field(min_length=1, repr=False)] = None
    api_key_env: typing.Annotated[
        str | None, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$"), Allowed("an environment variable name or null")
    ] = None
    # Waiting for a decode worker to reserve cache blocks (across retries and queueing; disaggregated only).
    reserve_timeout_s: PositiveSeconds = 10.0
    # From admission to the first token (prefill + cache transfer; colocated: queueing on the worker + prefill).
    first_token_timeout_s: PositiveSeconds = 120.0
    # Longest gap between two streamed chunks before the request is aborted.
    idle_stream_timeout_s: PositiveSeconds = 30.0
    # A stream with nothing to send for this long (a long prompt being prefilled) sends an SSE comment
    # line (": keep-alive") so proxies with idle timeouts keep the connection.
    sse_keepalive_s: PositiveSeconds = 15.0
    # Largest accepted request body; larger bodies are answered 413.
    max_body_bytes: typing.Annotated[int, Field(ge=1024)] = 8 * 1024 * 1024

    @field_validator("host")
    @classmethod
    def _host_form(cls, value: str) -> str:
        return _check_host(value)

    @model_validator(mode="after")
    def _one_key_source(self) -> RouterConfig:
        if self.api_key is not None and self.api_key_env is not None:
            raise _CrossFieldError(
                [(("api_key_env",), self.api_key_env, "api_key is also set", "at most one of api_key and api_key_env")]
            )
        return self

    def resolve_api_key(self, environ: Mapping[str, str] | None = None) -> str | None:
        """The API key to enforce (None: no auth). Reads api_key_env from `environ` (os.environ)."""
        if self.api_key_env is None:
            return self.api_key
        env = os.environ if environ is None else environ
        value = env.get(self.api_key_env)
        if not value:
            raise ConfigError(
                [ConfigProblem("router.api_key_env", f"environment variable {self.api_key_env} is not set or empty")]
            )
        return value


class PoolConfig(BaseModel):
    """Settings shared by the prefill and decode pools (one Ray actor per replica)."""

    model_config = _STRICT

    # Number of workers in the pool. `splitserve scale` changes it while serving.
    replicas: typing.Annotated[int, Field(ge=1)] = 1
    # GPUs each worker actor holds (Ray num_gpus): 0 on cpu; a fraction (0, 1) shares a GPU.
    gpus_per_worker: typing.Annotated[
        float, Field(ge=0), Allowed("0, a fraction in (0, 1) to share a GPU, or a whole number >= 1")
    ] = 0
    # Ray CPUs each worker actor reserves (a fraction shares a core: Ray's CPUs are an accounting, the
    # worker computes with one thread below one CPU). Default 0.25 on cpu, 1 on cuda (the host loop).
    cpus_per_worker: typing.Annotated[float, Field(gt=0, le=1024)] = 1.0
    # Cache size per worker: a fixed number of blocks, or (cuda only, whole GPUs only) the fraction
    # of the GPU memory left after loading weights. Exactly one is set after validation (see the
    # module docstring).
    num_blocks: typing.Annotated[int | None, Field(ge=1, le=_MAX_INT32)] = None
    cache_memory_fraction: typing.Annotated[float | None, Field(gt=0, le=1)] = None
    # Tokens per cache block. Must be equal in both pools (blocks are copied one-to-one).
    block_size: typing.Annotated[int, Allowed(f"a power of two in [1, {_MAX_BLOCK_SIZE}]")] = 64
    # Token budget of one forward step (all requests in the batch together).
    max_batch_tokens: typing.Annotated[int, Field(ge=1)] = 8192
    # Most requests in the running batch at once.
    max_running_requests: typing.Annotated[int, Field(ge=1)] = 256
    # Custom Ray resources each worker actor requests, to pin the pool to a node group,
    # e.g. {"prefill_node": 1} with nodes started as `ray start --resources='{"prefill_node": 8}'`.
    resources: typing.Annotated[
        dict[str, typing.Annotated[float, Field(gt=0)]],
        Allowed("a mapping of custom resource name (not CPU, GPU, memory) to a number > 0"),
    ] = Field(default_factory=dict)
    # Address each worker's gRPC server binds (the port is picked free). 0.0.0.0 on multi-node
    # clusters; the worker then advertises its node's IP.
    grpc_host: HostStr = "127.0.0.1"
    # Ranks one worker spans (tensor parallelism: attention heads, dense MLP and LM head split across
    # them), placed together on one node. On cuda one GPU per rank (gpus_per_worker = this, its default);
    # on cpu that many processes. Whether the model's shapes divide by it is checked by `splitserve plan`.
    tensor_parallel_size: typing.Annotated[int, Field(ge=1, le=_MAX_TENSOR_PARALLEL)] = 1
    # MoE experts split across the worker's ranks (expert parallelism) instead of each expert split
    # tensor-parallel across them. Needs tensor_parallel_size >= 2 (one rank has nothing to split).
    expert_parallel: bool = False
    # Memory of one GPU, in GiB (2**30 bytes), that `splitserve plan` / `up` plan the worker against.
    # None: the device's own memory on cuda; on cpu the plan is for information only.
    gpu_memory_gb: typing.Annotated[float | None, Field(gt=0, le=1_000_000)] = None

    @field_validator("grpc_host")
    @classmethod
    def _grpc_host_form(cls, value: str) -> str:
        return _check_host(value)

    @field_validator("gpus_per_worker")
    @classmethod
    def _whole_or_fraction(cls, value: float) -> float:
        if value > 1 and value != int(value):
            raise ValueError("more than one GPU must be a whole number")
        return value

    @field_validator("block_size")
    @classmethod
    def _power_of_two(cls, value: int) -> int:
        if not _is_power_of_two(value) or value > _MAX_BLOCK_SIZE:
            raise ValueError("not a power of two" if value <= _MAX_BLOCK_SIZE else "too large")
        return value

    @field_validator("resources")
    @classmethod
    def _custom_resources_only(cls, value: dict[str, float]) -> dict[str, float]:
        bad = sorted(k for k in value if k in _RAY_RESERVED_RESOURCES or not k)
        if bad:
            raise ValueError(f"{', '.join(repr(k) for k in bad)}: empty or reserved by Ray (GPUs are gpus_per_worker)")
        return value

    @model_validator(mode="after")
    def _pool_rules(self) -> PoolConfig:
        problems = self._pool_problems()
        if self.expert_parallel and self.tensor_parallel_size == 1:
            problems.append(
                (
                    ("expert_parallel",),
                    True,
                    "tensor_parallel_size is 1: one rank holds every expert, there is nothing to split",
                    "false, or true with tensor_parallel_size >= 2",
                )
            )
        if self.num_blocks is not None and self.cache_memory_fraction is not None:
            problems.append(
                (
                    ("cache_memory_fraction",),
                    self.cache_memory_fraction,
                    "num_blocks is also set",
                    "at most one of num_blocks and cache_memory_fraction",
                )
            )
        if problems:
            raise _CrossFieldError(problems)
        return self

    def _pool_problems(self) -> list[tuple[tuple[str, ...], Any, str, str]]:
        return []

    @property
    def cache_tokens(self) -> int | None:
        """Tokens one worker's cache holds, when sized by num_blocks."""
        return None if self.num_blocks is None else self.num_blocks * self.block_size


class PrefillPoolConfig(PoolConfig):
    """The prefill pool: runs prompts in chunks and writes their cache to a decode worker."""

    # 0 only in colocated mode (router.mode), where it is the default: there is no prefill pool.
    replicas: typing.Annotated[int, Field(ge=0)] = 1
    max_running_requests: typing.Annotated[int, Field(ge=1)] = 64
    # Tokens of one prompt computed per step (chunked prefill); <= max_batch_tokens.
    chunk_size: typing.Annotated[int, Field(ge=1)] = 2048

    def _pool_problems(self) -> list[tuple[tuple[str, ...], Any, str, str]]:
        if self.chunk_size > self.max_batch_tokens:
            return [
                (
                    ("chunk_size",),
                    self.chunk_size,
                    f"larger than max_batch_tokens ({self.max_batch_tokens})",
                    "an integer in [1, max_batch_tokens]",
                )
            ]
        return []


class DecodePoolConfig(PoolConfig):
    """The decode pool: receives the cache and generates tokens with MTP speculative decoding."""

    # Draft tokens the MTP layer proposes per step (0: no speculative decoding).
    mtp_draft_tokens: typing.Annotated[int, Field(ge=0, le=_MAX_MTP_DRAFT_TOKENS)] = 0
    # Relaxed acceptance of greedy drafts inside <think>...</think> (reasoning): a draft among the target's
    # top mtp_relaxed_topk tokens and within mtp_relaxed_delta of the best log-probability is accepted.
    # 0: off (exact acceptance everywhere). Needs a tokenizer with <think> and </think>.
    mtp_relaxed_topk: typing.Annotated[int, Field(ge=0)] = 0
    mtp_relaxed_delta: typing.Annotated[float, Field(ge=0.0)] = 0.0
    # Overlapped decode steps (engine/overlap.py): step N+1 is planned and launched before step N's tokens
    # are read on the host (with MTP too). None: on with CUDA, off on cpu; never with tensor parallel or
    # relaxed MTP acceptance.
    overlap_scheduling: bool | None = None
    # Tokens of one prompt computed per step: the chunked prefill of every prompt in colocated mode,
    # otherwise only the recomputation of a preempted request. <= max_batch_tokens.
    # None: min(512, max_batch_tokens).
    chunk_size: typing.Annotated[int | None, Field(ge=1)] = None

    def _pool_problems(self) -> list[tuple[tuple[str, ...], Any, str, str]]:
        problems: list[tuple[tuple[str, ...], Any, str, str]] = []
        need = 1 + self.mtp_draft_tokens
        if self.max_batch_tokens < need:
            problems.append(
                (
                    ("max_batch_tokens",),
                    self.max_batch_tokens,
                    f"one request needs 1 + mtp_draft_tokens = {need} tokens per step",
                    f"an integer >= {need}",
                )
            )
        if self.chunk_size is not None and self.chunk_size > self.max_batch_tokens:
            problems.append(
                (
                    ("chunk_size",),
                    self.chunk_size,
                    f"larger than max_batch_tokens ({self.max_batch_tokens})",
                    "null or an integer in [1, max_batch_tokens]",
                )
            )
        return problems

    @property
    def uses_mtp(self) -> bool:
        return self.mtp_draft_tokens > 0

    @property
    def effective_chunk_size(self) -> int:
        """The engine's chunk size on a decode worker (chunk_size, or its default)."""
        if self.chunk_size is not None:
            return self.chunk_size
        return min(_DECODE_DEFAULT_CHUNK_SIZE, self.max_batch_tokens)


class TransferConfig(BaseModel):
    """How cache blocks move from prefill to decode workers."""

    model_config = _STRICT

    # nixl: NIXL over UCX (NVLink / RDMA / shared memory), needs the `nixl` extra.
    # tcp: plain sockets, no extra dependency; the fallback where NIXL is not installed.
    backend: Literal["nixl", "tcp"] = "nixl"
    # A transfer not complete within this fails the request (and frees its blocks on both sides).
    timeout_s: PositiveSeconds = 30.0
    # Address the transfer endpoint binds and advertises (tcp listener; NIXL side channel).
    host: HostStr = "127.0.0.1"
    # Network device(s) for UCX, e.g. "mlx5_0:1" or "eth0" (UCX_NET_DEVICES). None: UCX chooses.
    interface: typing.Annotated[str | None, Field(min_length=1)] = None

    @field_validator("host")
    @classmethod
    def _host_form(cls, value: str) -> str:
        return _check_host(value)


class RayConfig(BaseModel):
    """Which Ray cluster runs the workers."""

    model_config = _STRICT

    # None: start a local Ray cluster (ray.init()). "auto": join the cluster on this node;
    # "host:port": join through the GCS address; "ray://host:port": join through Ray Client.
    address: typing.Annotated[
        str | None, Allowed("null (start a local cluster), 'auto', 'host:port' or 'ray://host:port'")
    ] = None
    # Ray namespace of the cluster's named actors; two clusters on one Ray cluster need two namespaces.
    namespace: typing.Annotated[str, Field(min_length=1)] = "splitserve"
    # Logical CPUs of a local cluster (address null). None: this machine's count, or room for 16 workers
    # (16 x the larger cpus_per_worker) if that is more (deploy/controller.py).
    num_cpus: typing.Annotated[int | None, Field(ge=1)] = None

    @field_validator("address")
    @classmethod
    def _address_form(cls, value: str | None) -> str | None:
        if value is None or value == "auto":
            return value
        m = _RAY_ADDRESS_RE.match(value)
        if m is None:
            raise ValueError("not 'auto', 'host:port' or 'ray://host:port'")
        if not 1 <= int(m.group(3)) <= 65535:
            raise ValueError("port out of range")
        return value

    @model_validator(mode="after")
    def _local_only(self) -> RayConfig:
        if self.num_cpus is not None and self.address is not None:
            raise _CrossFieldError(
                [
                    (
                        ("num_cpus",),
                        self.num_cpus,
                        "only applies to a local cluster, but ray.address is set",
                        "null when ray.address is set",
                    )
                ]
            )
        return self

    @property
    def starts_local_cluster(self) -> bool:
        return self.address is None


class SecurityConfig(BaseModel):
    """Who may talk to the workers. Every gRPC call and TCP-transfer handshake proves a secret made per
    run (nothing to configure); these fields add TLS to the workers' gRPC, for networks others can read."""

    model_config = _STRICT

    # PEM files: the workers' certificate (chain) and private key, and the CA that signed it (what the
    # router verifies). All three or none (none: plaintext gRPC). Relative paths resolve against the
    # YAML file's directory; the files are read where `splitserve up` runs and sent to the workers.
    grpc_tls_cert: typing.Annotated[str | None, Field(min_length=1)] = None
    grpc_tls_key: typing.Annotated[str | None, Field(min_length=1)] = None
    grpc_tls_ca: typing.Annotated[str | None, Field(min_length=1)] = None
    # The name checked against the certificate when it does not list the workers' addresses. None: the address.
    grpc_tls_server_name: typing.Annotated[str | None, Field(min_length=1)] = None

    @field_validator("grpc_tls_cert", "grpc_tls_key", "grpc_tls_ca")
    @classmethod
    def _resolve_path(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return None
        path = Path(value).expanduser()
        base = (info.context or {}).get("base_dir")
        if not path.is_absolute() and base is not None:
            path = Path(base) / path
        return str(path)

    @model_validator(mode="after")
    def _all_or_none(self) -> SecurityConfig:
        given = [n for n in ("grpc_tls_cert", "grpc_tls_key", "grpc_tls_ca") if getattr(self, n) is not None]
        if given and len(given) != 3:
            missing = [n for n in ("grpc_tls_cert", "grpc_tls_key", "grpc_tls_ca") if n not in given]
            raise _CrossFieldError(
                [
                    (
                        (n,),
                        None,
                        f"{', '.join(given)} set",
                        "a PEM file path when any of grpc_tls_cert, grpc_tls_key, grpc_tls_ca is set",
                    )
                    for n in missing
                ]
            )
        if self.grpc_tls_server_name is not None and not given:
            raise _CrossFieldError(
                [
                    (
                        ("grpc_tls_server_name",),
                        self.grpc_tls_server_name,
                        "no TLS files are set",
                        "null unless grpc_tls_cert, grpc_tls_key and grpc_tls_ca are set",
                    )
                ]
            )
        return self

    @property
    def uses_tls(self) -> bool:
        return self.grpc_tls_cert is not None


class ClusterConfig(BaseModel):
    """The whole cluster: what `splitserve up` reads."""

    model_config = _STRICT

    model: ModelConfig = Field(default_factory=ModelConfig)
    router: RouterConfig = Field(default_factory=RouterConfig)
    prefill: PrefillPoolConfig = Field(default_factory=PrefillPoolConfig)
    decode: DecodePoolConfig = Field(default_factory=DecodePoolConfig)
    transfer: TransferConfig = Field(default_factory=TransferConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    security: SecurityConfig = Field(default_factory=SecurityConfig)

    @model_validator(mode="before")
    @classmethod
    def _device_defaults(cls, data: Any) -> Any:
        """Fill the defaults that depend on model.device into the raw mapping (copying it)."""
        if not isinstance(data, Mapping):
            return data
        data = dict(data)
        for section in _SECTIONS:  # an empty YAML section ("router:") means "all defaults"
            if section in data and data[section] is None:
                data[section] = {}
        router = data.get("router", {})
        mode = (
            router.mode
            if isinstance(router, RouterConfig)
            else (router.get("mode") if isinstance(router, Mapping) else None)
        )
        prefill = data.get("prefill", {})
        if mode == "colocated" and isinstance(prefill, Mapping) and "replicas" not in prefill:
            data["prefill"] = {**prefill, "replicas": 0}  # no prefill pool unless the file asks (an error)
        model = data.get("model", {})
        if isinstance(model, ModelConfig):
            device = model.device
        elif isinstance(model, Mapping):
            device = model.get("device", "cpu")
            if device in ("cpu", "cuda") and "dtype" not in model:
                data["model"] = {**model, "dtype": "float32" if device == "cpu" else "bfloat16"}
        else:
            return data
        if device not in ("cpu", "cuda"):
            return data  # the device error is reported; pool defaults would only add noise
        for pool in ("prefill", "decode"):
            raw = data.get(pool, {})
            if not isinstance(raw, Mapping):
                continue
            raw = dict(raw)
            tp = raw.get("tensor_parallel_size", 1)
            raw.setdefault("gpus_per_worker", 0 if device == "cpu" else (tp if _is_int(tp) and tp >= 1 else 1))
            raw.setdefault("cpus_per_worker", _CPU_DEFAULT_CPUS_PER_WORKER if device == "cpu" else 1.0)
            if raw.get("num_blocks") is None and raw.get("cache_memory_fraction") is None:
                if device == "cpu":
                    raw["num_blocks"] = _CPU_DEFAULT_NUM_BLOCKS
                else:
                    raw["cache_memory_fraction"] = _CUDA_DEFAULT_CACHE_MEMORY_FRACTION
            data[pool] = raw
        return data

    @model_validator(mode="after")
    def _cluster_rules(self) -> ClusterConfig:
        problems: list[tuple[tuple[str, ...], Any, str, str]] = []
        device = self.model.device
        colocated = self.router.mode == "colocated"
        if colocated and self.prefill.replicas != 0:
            problems.append(
                (
                    ("prefill", "replicas"),
                    self.prefill.replicas,
                    "router.mode is 'colocated': decode workers prefill their own requests",
                    "0 (or leave it out) when router.mode is 'colocated'",
                )
            )
        if not colocated and self.prefill.replicas == 0:
            problems.append(
                (
                    ("prefill", "replicas"),
                    0,
                    "router.mode is 'disaggregated', which needs prefill workers",
                    "an integer >= 1, or set router.mode: colocated to run without a prefill pool",
                )
            )
        for name in ("prefill", "decode"):
            if colocated and name == "prefill":
                continue  # no prefill pool: its settings are unused
            pool: PoolConfig = getattr(self, name)
            if device == "cpu" and pool.gpus_per_worker != 0:
                problems.append(
                    (
                        (name, "gpus_per_worker"),
                        pool.gpus_per_worker,
                        "model.device is 'cpu'",
                        "0 when model.device is 'cpu'",
                    )
                )
            if device == "cuda" and pool.gpus_per_worker == 0:
                problems.append(
                    (
                        (name, "gpus_per_worker"),
                        pool.gpus_per_worker,
                        "model.device is 'cuda'",
                        "a number > 0 when model.device is 'cuda'",
                    )
                )
            tp = pool.tensor_parallel_size
            if device == "cuda" and tp > 1 and pool.gpus_per_worker != tp:
                problems.append(
                    (
                        (name, "gpus_per_worker"),
                        pool.gpus_per_worker,
                        f"{name}.tensor_parallel_size is {tp}: each rank holds one GPU (NCCL takes one rank per GPU)",
                        f"{tp} (= tensor_parallel_size), or leave it out",
                    )
                )
            if device == "cpu" and pool.cache_memory_fraction is not None:
                problems.append(
                    (
                        (name, "cache_memory_fraction"),
                        pool.cache_memory_fraction,
                        f"only sizes a GPU cache; on cpu set {name}.num_blocks",
                        "null when model.device is 'cpu'",
                    )
                )
            if device == "cuda" and 0 < pool.gpus_per_worker < 1 and pool.cache_memory_fraction is not None:
                problems.append(
                    (
                        (name, "cache_memory_fraction"),
                        pool.cache_memory_fraction,
                        f"{name}.gpus_per_worker {pool.gpus_per_worker} shares a GPU, so a fraction of its "
                        f"free memory would be claimed twice; set {name}.num_blocks",
                        "null when gpus_per_worker < 1",
                    )
                )
            if pool.num_blocks is None and pool.cache_memory_fraction is None:
                problems.append(
                    ((name, "num_blocks"), None, "no cache size", "num_blocks or cache_memory_fraction must be set")
                )
            if (
                self.model.max_model_len is not None
                and pool.cache_tokens is not None
                and pool.cache_tokens < self.model.max_model_len
            ):
                problems.append(
                    (
                        (name, "num_blocks"),
                        pool.num_blocks,
                        f"holds {pool.cache_tokens} tokens (num_blocks x block_size), fewer than "
                        f"model.max_model_len = {self.model.max_model_len}",
                        f"an integer >= {-(-self.model.max_model_len // pool.block_size)}",
                    )
                )
        if not colocated and self.prefill.block_size != self.decode.block_size:
            problems.append(
                (
                    ("decode", "block_size"),
                    self.decode.block_size,
                    f"differs from prefill.block_size ({self.prefill.block_size}); blocks are copied one-to-one",
                    f"{self.prefill.block_size} (= prefill.block_size)",
                )
            )
        if problems:
            raise _CrossFieldError(problems)
        return self


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def parse_config(
    data: Mapping[str, Any] | None,
    *,
    base_dir: str | os.PathLike[str] | None = None,
    source: str | None = None,
    lines: Mapping[tuple[str, ...], int] | None = None,
) -> ClusterConfig:
    """Validate an already-loaded mapping (e.g. from YAML or JSON) into a ClusterConfig.

    Args:
        data: the document; None (an empty file) means all defaults.
        base_dir: where relative `model.path` values are resolved (None: left as given).
        source: a name for error messages (the file path).
        lines: key path -> 1-based line, to point error messages at lines.
    Raises:
        ConfigError: listing every problem found.
    """
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(
            [
                ConfigProblem(
                    "", f"the top level must be a mapping of sections ({', '.join(_SECTIONS)}); got {_type_name(data)}"
                )
            ],
            source,
        )
    context = {"base_dir": None if base_dir is None else str(base_dir)}
    try:
        return ClusterConfig.model_validate(data, context=context)
    except ValidationError as exc:
        problems = _problems_from_validation(exc, lines or {})
        raise ConfigError(problems, source) from None


def load_config(path: str | os.PathLike[str]) -> ClusterConfig:
    """Read and validate a cluster YAML file. Relative model paths resolve against its directory.

    Raises:
        ConfigError: the file is missing or unreadable, is not valid YAML (file and line named),
            or fails validation (every problem named by field path and line).
    """
    path = Path(path)
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([ConfigProblem("", f"cannot read the file: {exc}")], source) from None
    data, lines = _load_yaml(text, source)
    cfg = parse_config(data, base_dir=path.resolve().parent, source=source, lines=lines)
    logger.debug("loaded cluster config %s", source)
    return cfg


def with_overrides(
    cfg: ClusterConfig,
    *,
    host: str | None = None,
    port: int | None = None,
    prefill: int | Mapping[str, Any] | None = None,
    decode: int | Mapping[str, Any] | None = None,
) -> ClusterConfig:
    """A copy of `cfg` with command-line overrides applied, validated again.

    Args:
        host, port: the router's listen address.
        prefill, decode: an int sets the pool's replicas; a mapping overrides any pool fields
            (setting num_blocks clears cache_memory_fraction and vice versa unless both are given).
    Raises:
        ConfigError: the result is invalid (paths name the overridden fields).
    """
    data = cfg.model_dump()
    if host is not None:
        data["router"]["host"] = host
    if port is not None:
        data["router"]["port"] = port
    for name, override in (("prefill", prefill), ("decode", decode)):
        if override is None:
            continue
        if not isinstance(override, Mapping):
            override = {"replicas": override}
        pool = data[name]
        sizing = {"num_blocks", "cache_memory_fraction"}
        given = sizing & set(override)
        if len(given) == 1:
            (other,) = sizing - given
            pool[other] = None
        pool.update(override)
    return parse_config(data, source="(with overrides)")


# --------------------------------------------------------------------------------------------
# YAML with line numbers and duplicate-key detection
# --------------------------------------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys (PyYAML silently keeps the last one)."""


def _construct_mapping_no_duplicates(loader: _Loader, node: yaml.MappingNode) -> dict[Any, Any]:
    loader.flatten_mapping(node)
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            first = seen.get(key)
        except TypeError:
            continue  # unhashable key: construct_mapping reports it
        if first is not None:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping",
                node.start_mark,
                f"found duplicate key {key!r} (first at line {first})",
                key_node.start_mark,
            )
        seen[key] = key_node.start_mark.line + 1
    return loader.construct_mapping(node, deep=True)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping_no_duplicates)


def _load_yaml(text: str, source: str) -> tuple[Any, dict[tuple[str, ...], int]]:
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        data = None if node is None else loader.construct_document(node)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        parts = [p for p in (exc.context, exc.problem) if p]
        line = None if mark is None else mark.line + 1
        col = "" if mark is None else f" (column {mark.column + 1})"
        raise ConfigError([ConfigProblem("", f"invalid YAML{col}: {'; '.join(parts)}", line)], source) from None
    except yaml.YAMLError as exc:
        raise ConfigError([ConfigProblem("", f"YAML error: {exc}")], source) from None
    finally:
        loader.dispose()
    lines: dict[tuple[str, ...], int] = {}
    if node is not None:
        _collect_lines(node, (), lines)
    return data, lines


def _collect_lines(node: yaml.Node, prefix: tuple[str, ...], out: dict[tuple[str, ...], int]) -> None:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            if isinstance(key_node, yaml.ScalarNode):
                path = (*prefix, str(key_node.value))
                out.setdefault(path, key_node.start_mark.line + 1)
                _collect_lines(value_node, path, out)


# --------------------------------------------------------------------------------------------
# Turning pydantic errors into problems
# --------------------------------------------------------------------------------------------

_TYPE_ERRORS = {
    "int_type",
    "float_type",
    "bool_type",
    "string_type",
    "dict_type",
    "model_type",
    "model_attributes_type",
    "list_type",
    "literal_error",
    "none_required",
    "invalid_key",
    "int_parsing",
    "float_parsing",
    "bool_parsing",
    "finite_number",
    "int_from_float",
    "is_instance_of",
}


def _problems_from_validation(exc: ValidationError, lines: Mapping[tuple[str, ...], int]) -> list[ConfigProblem]:
    problems: list[ConfigProblem] = []
    for err in exc.errors(include_url=False):
        loc = tuple(err["loc"])
        ctx = err.get("ctx") or {}
        inner = ctx.get("error")
        if isinstance(inner, _CrossFieldError):
            for rel, value, reason, allowed in inner.problems:
                path = (*loc, *rel)
                msg = f"got {_fmt_value(path, value)}: {reason}; allowed: {allowed}"
                problems.append(ConfigProblem(_dotted(path), msg, _line(lines, path)))
            continue
        problems.append(ConfigProblem(_dotted(loc), _message(err, loc), _line(lines, loc)))
    # Stable order: by line where known, then by path.
    problems.sort(key=lambda p: (p.line is None, p.line or 0, p.path))
    return problems


def _message(err: Mapping[str, Any], loc: tuple[Any, ...]) -> str:
    kind = err["type"]
    value = err.get("input")
    if kind == "extra_forbidden":
        parent = _model_at(loc[:-1])
        key = str(loc[-1])
        msg = "unknown key"
        if parent is not None:
            names = list(parent.model_fields)
            pools: dict[type[PoolConfig], str] = {PrefillPoolConfig: "prefill", DecodePoolConfig: "decode"}
            other = next((n for cls, n in pools.items() if cls is not parent and key in cls.model_fields), None)
            close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
            if parent in pools and other is not None:
                msg += f"; {key} is a {other}-only setting"
            elif close:
                msg += f"; did you mean '{close[0]}'?"
            msg += f" (valid keys here: {', '.join(names)})"
        return msg
    if kind == "invalid_key" or (loc and loc[-1] == "[key]"):
        key = loc[-2] if loc and loc[-1] == "[key]" else loc[-1]
        return f"key {key!r} is {_type_name(key)}; allowed: keys are strings"
    allowed = _allowed_at(loc)
    got = f"got {_fmt_value(loc, value)}"
    if kind == "missing":
        reason = "required"
        got = "missing"
    elif kind in _TYPE_ERRORS:
        reason = "" if kind == "literal_error" else f"wrong type ({_type_name(value)})"
        if kind == "finite_number":
            reason = "not a finite number"
    elif kind in ("value_error", "assertion_error"):
        reason = err["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
    elif kind in (
        "greater_than",
        "greater_than_equal",
        "less_than",
        "less_than_equal",
        "string_too_short",
        "string_pattern_mismatch",
        "too_short",
        "too_long",
    ):
        reason = ""  # the allowed range says it
    else:
        reason = err["msg"]
    msg = got
    if reason:
        msg += f": {reason}"
    if allowed:
        msg += f"; allowed: {allowed}"
    elif not reason:
        msg += f": {err['msg']}"
    return msg


def _line(lines: Mapping[tuple[str, ...], int], loc: tuple[Any, ...]) -> int | None:
    path = tuple(str(p) for p in loc)
    while path:
        if path in lines:
            return lines[path]
        path = path[:-1]
    return None


def _dotted(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if part == "[key]":
            continue  # pydantic's marker for "the key itself" in mapping errors
        out += ("." if out else "") + str(part)
    return out


def _fmt_value(loc: tuple[Any, ...], value: Any) -> str:
    if loc and loc[-1] == "api_key" and value is not None:
        return "<redacted>"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, BaseModel):
        value = value.model_dump()
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _type_name(value: Any) -> str:
    names = {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "a mapping",
        type(None): "null",
    }
    for t, name in names.items():
        if type(value) is t:
            return name
    return type(value).__name__


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The model class at `loc` (a path of field names from ClusterConfig), if it is one."""
    current: Any = ClusterConfig
    for part in loc:
        if not (isinstance(current, type) and issubclass(current, BaseModel)) or part not in current.model_fields:
            return None
        current = current.model_fields[part].annotation
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _allowed_at(loc: tuple[Any, ...]) -> str:
    """Allowed values, in words, of the field (or mapping value) at `loc`."""
    current: Any = ClusterConfig
    annotation: Any = ClusterConfig
    metadata: list[Any] = []
    for part in loc:
        if isinstance(current, type) and issubclass(current, BaseModel):
            field = current.model_fields.get(part) if isinstance(part, str) else None
            if field is None:
                return ""
            annotation, metadata = field.annotation, list(field.metadata)
            current = annotation
        elif typing.get_origin(_strip_optional(current)[0]) is dict:
            if part == "[key]":
                return "a non-empty string"
            value_type = typing.get_args(_strip_optional(current)[0])[1]
            annotation, metadata = _split_annotated(value_type)
            current = annotation
        else:
            return ""
    return _describe(annotation, metadata)


def _split_annotated(tp: Any) -> tuple[Any, list[Any]]:
    if typing.get_origin(tp) is typing.Annotated:
        base, *meta = typing.get_args(tp)
        flat: list[Any] = []
        for m in meta:  # a Field(...) inside Annotated carries its constraints in .metadata
            flat.extend(m.metadata if isinstance(m, FieldInfo) else [m])
        return base, flat
    return tp, []


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _describe(annotation: Any, metadata: list[Any]) -> str:
    for m in metadata:
        if isinstance(m, Allowed):
            return m.text
    tp, nullable = _strip_optional(annotation)
    tp, inner_meta = _split_annotated(tp)
    metadata = [*metadata, *inner_meta]
    for m in metadata:
        if isinstance(m, Allowed):
            return m.text
    text = _describe_base(tp, metadata)
    return f"{text} or null" if nullable else text


def _describe_base(tp: Any, metadata: list[Any]) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if tp is bool:
        return "true or false"
    if tp in (int, float):
        noun = "an integer" if tp is int else "a number"
        lo: Any = None
        hi: Any = None
        lo_open = hi_open = False
        for m in metadata:
            if isinstance(m, annotated_types.Ge):
                lo = m.ge
            elif isinstance(m, annotated_types.Gt):
                lo, lo_open = m.gt, True
            elif isinstance(m, annotated_types.Le):
                hi = m.le
            elif isinstance(m, annotated_types.Lt):
                hi, hi_open = m.lt, True
        if lo is not None and hi is not None:
            return f"{noun} in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
        if lo is not None:
            return f"{noun} {'>' if lo_open else '>='} {lo}"
        if hi is not None:
            return f"{noun} {'<' if hi_open else '<='} {hi}"
        return noun
    if tp is str:
        return "a non-empty string" if any(isinstance(m, annotated_types.MinLen) for m in metadata) else "a string"
    if typing.get_origin(tp) is dict:
        value_type, value_meta = _split_annotated(typing.get_args(tp)[1])
        return f"a mapping of name to {_describe(value_type, value_meta)}"
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return f"a mapping with keys {', '.join(tp.model_fields)}"
    return getattr(tp, "__name__", str(tp))
