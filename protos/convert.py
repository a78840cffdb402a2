"""Conversions between wire messages and in-process types.

SamplingParams travels with explicit presence (see worker.proto): `sampling_params_to_proto` sets
every field it has (None -> absent), `sampling_params_from_proto` maps an absent field to the
dataclass default, never to protobuf's zero value, and validates the result. `logit_bias` travels
as a map (empty = no bias, the default) and comes back sorted by token id, its canonical form.
"""

from __future__ import annotations

import dataclasses

from splitserve.engine.sampling_params import SamplingParams

from . import worker_pb2 as pb

__all__ = ["sampling_params_from_proto", "sampling_params_to_proto"]

# Scalar fields carried with `optional` presence; the list fields (stop, stop_token_ids) are the rest.
_SCALARS = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "seed",
    "max_tokens",
    "ignore_eos",
    "logprobs",
    "prompt_logprobs",
)
_LISTS = ("stop", "stop_token_ids")
_MAPS = ("logit_bias",)
_SEED_MASK = 2**64 - 1
if set(_SCALARS) | set(_LISTS) | set(_MAPS) != {f.name for f in dataclasses.fields(SamplingParams)}:
    raise ImportError("engine SamplingParams and its wire message disagree; update protos/worker.proto and convert.py")


def sampling_params_to_proto(params: SamplingParams) -> pb.SamplingParams:
    """The wire form of `params`, with every non-None field set explicitly.

    `seed` is sent modulo 2**64 (how the engine's sampler uses it), so seeds outside [0, 2**64)
    come back as their residue and sample the same tokens.

    Raises:
        ValueError: a value does not fit its wire type (e.g. top_k beyond int32).
    """
    msg = pb.SamplingParams()
    for name in _SCALARS:
        value = getattr(params, name)
        if value is None:
            continue
        if name == "seed":
            value &= _SEED_MASK  # the engine seeds with seed mod 2**64: same samples, fits uint64
        try:
            setattr(msg, name, value)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"SamplingParams.{name} = {value!r} does not fit the wire type: {exc}") from None
    msg.stop.extend(params.stop)
    msg.stop_token_ids.extend(params.stop_token_ids)
    for token_id, bias in params.logit_bias:
        try:
            msg.logit_bias[token_id] = bias
        except (TypeError, ValueError) as exc:
            raise ValueError(
                f"SamplingParams.logit_bias token id {token_id} does not fit the wire type: {exc}"
            ) from None
    return msg


def sampling_params_from_proto(msg: pb.SamplingParams) -> SamplingParams:
    """The SamplingParams a wire message asks for: absent fields take the engine defaults.

    Raises:
        ValueError: the values are invalid (SamplingParams validates itself).
    """
    kwargs: dict[str, object] = {name: getattr(msg, name) for name in _SCALARS if msg.HasField(name)}
    kwargs["stop"] = tuple(msg.stop)
    kwargs["stop_token_ids"] = tuple(msg.stop_token_ids)
    kwargs["logit_bias"] = tuple(msg.logit_bias.items())  # SamplingParams sorts and validates
    return SamplingParams(**kwargs)  # type: ignore[arg-type]


def request_error_code(e: Exception) -> pb.ErrorCode:
    """The wire code of an engine's RequestError: TOO_LONG (never fits: the client's 400), else INVALID_ARGUMENT."""
    from splitserve.engine.engine import TooLong

    return pb.ERROR_CODE_TOO_LONG if isinstance(e, TooLong) else pb.ERROR_CODE_INVALID_ARGUMENT
