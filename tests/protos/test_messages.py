"""Round trips of the wire messages, and SamplingParams' explicit presence."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from splitserve.engine.sampling_params import SamplingParams
from splitserve.protos import worker_pb2 as pb
from splitserve.protos.convert import sampling_params_from_proto, sampling_params_to_proto


def _roundtrip(msg):  # type: ignore[no-untyped-def]
    back = type(msg)()
    back.ParseFromString(msg.SerializeToString())
    return back


def test_absent_sampling_fields_are_engine_defaults_not_zero() -> None:
    empty = _roundtrip(pb.SamplingParams())
    assert not empty.HasField("temperature") and not empty.HasField("max_tokens")
    assert sampling_params_from_proto(empty) == SamplingParams()
    # Zero, when present, is kept: temperature 0 means greedy, not "unset".
    greedy = _roundtrip(pb.SamplingParams(temperature=0.0, top_k=0, logprobs=0))
    assert greedy.HasField("temperature") and greedy.HasField("logprobs")
    params = sampling_params_from_proto(greedy)
    assert params.greedy and params.logprobs == 0 and params.prompt_logprobs is None


def test_logit_bias_travels_as_a_map() -> None:
    assert not pb.SamplingParams().logit_bias and sampling_params_from_proto(pb.SamplingParams()).logit_bias == ()
    params = SamplingParams(logit_bias={129279: -100.0, 0: 100.0, 7: 0.125})
    msg = _roundtrip(sampling_params_to_proto(params))
    assert dict(msg.logit_bias) == {129279: -100.0, 0: 100.0, 7: 0.125}
    assert sampling_params_from_proto(msg).logit_bias == ((0, 100.0), (7, 0.125), (129279, -100.0))


def test_invalid_sampling_values_raise_value_error() -> None:
    import pytest

    with pytest.raises(ValueError, match="max_tokens"):
        sampling_params_from_proto(pb.SamplingParams(max_tokens=0))
    with pytest.raises(ValueError, match="top_p"):
        sampling_params_from_proto(pb.SamplingParams(top_p=0.0))
    with pytest.raises(ValueError, match="logit_bias"):
        sampling_params_from_proto(pb.SamplingParams(logit_bias={5: 100.5}))
    with pytest.raises(ValueError, match="logit_bias"):
        sampling_params_from_proto(pb.SamplingParams(logit_bias={-5: 1.0}))


finite = st.floats(allow_nan=False, allow_infinity=False, width=64)
sampling_params = st.builds(
    SamplingParams,
    temperature=st.floats(0, 10),
    top_p=st.floats(0, 1, exclude_min=True),
    top_k=st.integers(-(2**31), 2**31 - 1),
    min_p=st.floats(0, 1),
    presence_penalty=finite,
    frequency_penalty=finite,
    repetition_penalty=st.floats(0, 100, exclude_min=True),
    seed=st.none() | st.integers(0, 2**64 - 1),
    max_tokens=st.integers(1, 2**32 - 1),
    stop=st.lists(st.text(max_size=5), max_size=3).map(tuple),
    stop_token_ids=st.lists(st.integers(0, 2**31 - 1), max_size=3).map(tuple),
    ignore_eos=st.booleans(),
    logprobs=st.none() | st.integers(0, 20),
    prompt_logprobs=st.none() | st.integers(0, 20),
    logit_bias=st.dictionaries(st.integers(0, 2**31 - 1), st.floats(-100, 100), max_size=4),
)


@settings(max_examples=200, deadline=None)
@given(sampling_params)
def test_sampling_params_round_trip_exactly(params: SamplingParams) -> None:
    msg = _roundtrip(sampling_params_to_proto(params))
    assert sampling_params_from_proto(msg) == params
    # None stays absent; everything else is explicitly present.
    assert msg.HasField("seed") == (params.seed is not None)
    assert msg.HasField("logprobs") == (params.logprobs is not None)
    assert msg.HasField("temperature")


@given(st.integers(-(2**70), 2**70))
def test_seeds_travel_modulo_2_64(seed: int) -> None:
    """The engine seeds its generator with seed mod 2**64; the wire carries exactly that."""
    back = sampling_params_from_proto(_roundtrip(sampling_params_to_proto(SamplingParams(seed=seed))))
    assert back.seed == seed % 2**64


def test_sampling_values_that_do_not_fit_the_wire() -> None:
    import pytest

    with pytest.raises(ValueError, match="top_k"):
        sampling_params_to_proto(SamplingParams(top_k=2**40))
    with pytest.raises(ValueError, match="logit_bias"):
        sampling_params_to_proto(SamplingParams(logit_bias={2**40: 1.0}))


def test_reserve_reply_oneof() -> None:
    ok = _roundtrip(
        pb.ReserveReply(
            reservation=pb.Reservation(
                block_ids=[3, 1, 2], epoch=2**63 + 5, lease_ms=5000, block_size=64, agent_name="decode-0/1"
            )
        )
    )
    assert ok.WhichOneof("result") == "reservation"
    assert list(ok.reservation.block_ids) == [3, 1, 2] and ok.reservation.epoch == 2**63 + 5
    no = _roundtrip(pb.ReserveReply(refusal=pb.Refusal(reason=pb.REFUSAL_REASON_NO_SPACE, free_blocks=7)))
    assert no.WhichOneof("result") == "refusal" and no.refusal.reason == pb.REFUSAL_REASON_NO_SPACE
    # Setting one arm clears the other.
    both = pb.ReserveReply(reservation=pb.Reservation(epoch=1))
    both.refusal.free_blocks = 1
    assert both.WhichOneof("result") == "refusal" and not both.HasField("reservation")


def test_generate_request_and_stream_chunks() -> None:
    hidden = pb.Tensor(dtype="bfloat16", shape=[7168], data=bytes(range(256)) * 56)
    req = pb.GenerateRequest(
        request_id="req-1",
        epoch=9,
        prompt_token_ids=[1, 2, 3],
        sampling=sampling_params_to_proto(SamplingParams(temperature=0.0, logprobs=2)),
        first_token=42,
        first_token_logprobs=pb.TokenLogprobs(
            token_id=42, logprob=-0.5, top_token_ids=[42, 7], top_logprobs=[-0.5, -1.0]
        ),
        mtp_hidden=hidden,
    )
    back = _roundtrip(req)
    assert back == req
    assert back.mtp_hidden.data == hidden.data and list(back.mtp_hidden.shape) == [7168]
    assert sampling_params_from_proto(back.sampling).logprobs == 2
    assert not pb.GenerateRequest(request_id="r").HasField("mtp_hidden")  # absent without MTP

    chunks = [
        pb.GenerateChunk(delta=pb.TokenDelta(token_ids=[5, 6])),
        pb.GenerateChunk(
            finished=pb.Finished(
                finish_reason=pb.FINISH_REASON_STOP,
                stop_token_id=2,
                prompt_tokens=3,
                completion_tokens=4,
                draft_tokens=2,
                accepted_draft_tokens=1,
            )
        ),
        pb.GenerateChunk(error=pb.Error(code=pb.ERROR_CODE_TRANSFER_FAILED, message="req-1: peer gone")),
    ]
    kinds = [_roundtrip(c).WhichOneof("chunk") for c in chunks]
    assert kinds == ["delta", "finished", "error"]
    fin = _roundtrip(chunks[1]).finished
    assert fin.HasField("stop_token_id") and fin.stop_token_id == 2
    assert not pb.Finished(finish_reason=pb.FINISH_REASON_LENGTH).HasField("stop_token_id")


def test_prefill_request_and_reply() -> None:
    req = pb.PrefillRequest(
        request_id="req-2",
        prompt_token_ids=list(range(100)),
        sampling=sampling_params_to_proto(SamplingParams()),
        destination=pb.Destination(
            decode_worker_id="decode-0",
            decode_address="127.0.0.1:5555",
            agent_name="decode-0/1",
            block_ids=[0, 1],
            epoch=3,
        ),
    )
    assert _roundtrip(req) == req
    reply = _roundtrip(
        pb.PrefillReply(
            prefill=pb.PrefillResult(first_token=11, num_cached_tokens=64, transfer_bytes=123456, transfer_seconds=0.01)
        )
    )
    assert reply.WhichOneof("result") == "prefill" and reply.prefill.num_cached_tokens == 64
    err = _roundtrip(pb.PrefillReply(error=pb.Error(code=pb.ERROR_CODE_INVALID_ARGUMENT, message="too long")))
    assert err.WhichOneof("result") == "error"


def test_handshake_messages() -> None:
    peer = pb.PeerInfo(
        protocol_version=1,
        compat_hash="abc",
        worker_id="prefill-0",
        incarnation=77,
        transfer=pb.TransferMetadata(
            backend="nixl", agent_name="prefill-0/77", agent_metadata=b"\x00\x01blob", layout=b"layout"
        ),
    )
    assert _roundtrip(pb.HandshakeRequest(peer=peer)).peer == peer
    refused = _roundtrip(pb.HandshakeReply(error=pb.Error(code=pb.ERROR_CODE_INCOMPATIBLE, message="hash")))
    assert refused.WhichOneof("result") == "error"


def test_unsigned_fields_reject_negative_values() -> None:
    import pytest

    with pytest.raises(ValueError):
        pb.ReserveRequest(prompt_len=-1)
