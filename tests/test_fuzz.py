"""Property tests (Hypothesis) of the two parsers that read bytes from outside: a payload
(`decode_payload`, what any Redis writer may have stored) and a job (`Job.from_json`, any
stream entry). On any input they either succeed or raise their one documented rejection,
`PayloadRejected` or `MalformedJob`; never another exception, which would be a 500 on the
request path or a crashed claim in a worker.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import struct
from typing import Any

import pytest

hypothesis = pytest.importorskip("hypothesis")  # the dev extra; see pyproject.toml

from hypothesis import HealthCheck, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from cache_store import Job, MalformedJob, PayloadExpectation, PayloadRejected  # noqa: E402
from cache_store.payload import decode_payload  # noqa: E402
from tests.fixtures.store_backends import make_job, make_payload  # noqa: E402

JOB = make_job(1)
SECRET = b"fuzz-payload-secret-0123"
EXPECTED = PayloadExpectation.for_job(JOB)
SIGNED = dataclasses.replace(EXPECTED, secret=SECRET)
"""A reader holding the payload secret: every property runs both readers."""
VALID = make_payload(JOB, secret=SECRET)
FUZZ = settings(
    max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


def decode(data: bytes) -> None:
    for expected in (EXPECTED, SIGNED):
        with contextlib.suppress(PayloadRejected):  # the documented rejection; else fails
            decode_payload(data, expected=expected)


def parse(data: str | bytes) -> None:
    with contextlib.suppress(MalformedJob):
        Job.from_json(data)


def _with_header(header: Any, body: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


# ---------------------------------------------------------------------- decode_payload


@FUZZ
@given(st.binary(max_size=2048))
@example(b"")
@example(struct.pack("<Q", 20_000) + b"[" * 20_000)  # nesting deeper than json's recursion
@example(struct.pack("<Q", 2**63) + b"{}")
def test_decode_payload_of_arbitrary_bytes_only_rejects(data: bytes) -> None:
    decode(data)


@FUZZ
@given(st.data())
def test_decode_payload_of_a_mutated_valid_payload_only_rejects(data: st.DataObject) -> None:
    payload = bytearray(VALID)
    for _ in range(data.draw(st.integers(1, 8))):
        position = data.draw(st.integers(0, len(payload) - 1))
        payload[position] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(payload)))
    decode(bytes(payload[:cut]))
    decode(bytes(payload))


@FUZZ
@given(
    st.dictionaries(st.text(max_size=12), json_values, max_size=6),
    st.dictionaries(st.text(max_size=12), json_values, max_size=6),
    st.binary(max_size=64),
)
def test_decode_payload_of_arbitrary_safetensors_headers_only_rejects(
    metadata: dict[str, Any], tensor: dict[str, Any], body: bytes
) -> None:
    good = json.loads(VALID[8 : 8 + struct.unpack("<Q", VALID[:8])[0]])
    decode(_with_header({"__metadata__": metadata, "latents": tensor}, body))
    decode(_with_header({**good, "latents": tensor}, body))
    decode(_with_header({**good, "__metadata__": {**good["__metadata__"], **metadata}},
                        VALID[8 + struct.unpack("<Q", VALID[:8])[0] :]))  # fmt: skip


# ---------------------------------------------------------------------- Job.from_json


@FUZZ
@given(st.binary(max_size=1024) | st.text(max_size=1024))
@example(b"1")
@example("[" * 100_000)
@example('"text"')
def test_job_from_arbitrary_bytes_only_rejects(data: str | bytes) -> None:
    parse(data)


@FUZZ
@given(
    st.fixed_dictionaries(
        {},
        optional={
            "v": st.just(1) | json_values,
            "key": st.just(JOB.key) | json_values,
            "tenant": st.just(JOB.tenant) | json_values,
            "decoder_fp": st.just(JOB.decoder_fp) | json_values,
            "coprocessor_fp": st.just(JOB.coprocessor_fp) | json_values,
            "token_ids": st.just(JOB.token_ids) | st.lists(st.integers(), max_size=8) | json_values,
            "enqueued_at": st.floats() | st.integers() | json_values,
        },
    )
)
@example({**json.loads(JOB.to_json()), "enqueued_at": 10**400})
def test_job_from_arbitrary_job_like_objects_only_rejects(fields: dict[str, Any]) -> None:
    parse(json.dumps(fields))


def test_a_valid_job_and_payload_still_parse() -> None:
    assert Job.from_json(JOB.to_json()) == JOB
    assert decode_payload(VALID, expected=EXPECTED).key == JOB.key
    assert decode_payload(VALID, expected=SIGNED).key == JOB.key
