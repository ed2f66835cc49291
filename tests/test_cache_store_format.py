"""Pure logic of the contract: prefix keys, Redis key names, jobs, the payload format."""

from __future__ import annotations

import hashlib
import json
import pickle
import struct

import pytest
import torch
from redis.crc import key_slot
from safetensors.torch import save as st_save

from cache_store import (
    FORMAT_VERSION,
    Job,
    MalformedJob,
    PayloadExpectation,
    PayloadRejected,
    decode_payload,
    encode_payload,
    prefix_key,
)
from cache_store.keys import claim_key, payload_key, state_key, validate_key
from cache_store.payload import _tensor_bytes

BASE = {"decoder_fp": "dec", "coprocessor_fp": "cop", "tenant": "acme", "token_ids": [1, 2, 3]}


def _reference_key(decoder_fp: str, coprocessor_fp: str, tenant: str, ids: list[int]) -> str:
    """The derivation as documented in docs/architecture.md, written out independently."""
    h = hashlib.sha256(b"deliberate-prefix-key\0")
    h.update(struct.pack("<I", FORMAT_VERSION))
    for field in (decoder_fp, coprocessor_fp, tenant):
        raw = field.encode()
        h.update(struct.pack("<I", len(raw)) + raw)
    h.update(struct.pack("<Q", len(ids)))
    h.update(b"".join(struct.pack("<I", t) for t in ids))
    return h.hexdigest()


def test_prefix_key_follows_the_documented_derivation() -> None:
    ids = [0, 1, 49151, 2**32 - 1]
    key = prefix_key(decoder_fp="d", coprocessor_fp="c", tenant="t", token_ids=ids)
    assert key == _reference_key("d", "c", "t", ids)
    assert validate_key(key) == key


def test_every_input_changes_the_key() -> None:
    base = prefix_key(**BASE)
    variants = [
        {**BASE, "decoder_fp": "dec2"},
        {**BASE, "coprocessor_fp": "cop2"},
        {**BASE, "tenant": "other"},
        {**BASE, "token_ids": [1, 2, 4]},  # same length, one id differs
        {**BASE, "token_ids": [3, 2, 1]},  # same ids, other order
        {**BASE, "token_ids": [1, 2, 3, 0]},  # a trailing zero id is still a token
        # Characters moved between fields must not collide (fields are length-prefixed).
        {**BASE, "decoder_fp": "de", "coprocessor_fp": "ccop"},
    ]
    keys = {prefix_key(**v) for v in variants}
    assert base not in keys and len(keys) == len(variants)


def test_token_ids_must_be_uint32() -> None:
    for bad in ([-1], [2**32], [1.5]):
        with pytest.raises((ValueError, TypeError)):
            prefix_key(**{**BASE, "token_ids": bad})
    with pytest.raises(ValueError, match="empty"):
        prefix_key(**{**BASE, "token_ids": []})
    with pytest.raises(ValueError, match="tenant is empty"):
        prefix_key(**{**BASE, "tenant": ""})


def test_redis_keys_of_one_prefix_share_one_cluster_slot() -> None:
    key = prefix_key(**BASE)
    names = [payload_key(key), state_key(key), claim_key(key)]
    assert all(name.startswith(f"deliberate:{{{key}}}:") for name in names)
    assert len({key_slot(name.encode()) for name in names}) == 1
    with pytest.raises(ValueError, match="not a prefix key"):
        payload_key("abc}:x")


def test_job_json_round_trip_and_checks() -> None:
    job = Job.create(tenant="acme", decoder_fp="dec", coprocessor_fp="cop", token_ids=[5, 6, 7])
    assert Job.from_json(job.to_json()) == job
    assert json.loads(job.to_json())["token_ids"] == [5, 6, 7]  # plain JSON, no pickle
    forged = json.loads(job.to_json()) | {"token_ids": [5, 6, 8]}
    with pytest.raises(MalformedJob, match="not the hash"):
        Job.from_json(json.dumps(forged))
    for bad in ("{", json.dumps(json.loads(job.to_json()) | {"v": 99}), pickle.dumps(job)):
        with pytest.raises(MalformedJob):
            Job.from_json(bad)
    with pytest.raises(MalformedJob):
        Job.from_json(json.dumps(json.loads(job.to_json()) | {"token_ids": [True, 6, 7]}))
    hand_made = Job(job.key, "other-tenant", "dec", "cop", [5, 6, 7])
    with pytest.raises(MalformedJob, match=r"Job\.create"):
        hand_made.verify()


def _expect(key: str, **overrides: object) -> PayloadExpectation:
    fields: dict[str, object] = {
        "key": key,
        "decoder_fp": "dec",
        "coprocessor_fp": "cop",
        "prefix_len": 3,
        "n_latents": 4,
        "hidden": 8,
        "dtype": torch.bfloat16,
    }
    fields.update(overrides)
    return PayloadExpectation(**fields)  # type: ignore[arg-type]


def _encode(key: str, latents: torch.Tensor | None = None, **overrides: object) -> bytes:
    fields: dict[str, object] = {
        "key": key,
        "decoder_fp": "dec",
        "coprocessor_fp": "cop",
        "prefix_len": 3,
    }
    fields.update(overrides)
    tensor = torch.randn(4, 8) if latents is None else latents
    return encode_payload(tensor, **fields)  # type: ignore[arg-type]


def test_payload_round_trip_keeps_metadata_and_exact_values() -> None:
    key = prefix_key(**BASE)
    latents = torch.randn(4, 8)
    data = _encode(key, latents, created_at=1234.5)
    payload = decode_payload(data, expected=_expect(key))
    assert torch.equal(payload.latents, latents.to(torch.bfloat16))
    assert (payload.n_latents, payload.hidden, payload.dtype) == (4, 8, torch.bfloat16)
    assert (payload.created_at, payload.format_version, payload.nbytes) == (
        1234.5,
        FORMAT_VERSION,
        len(data),
    )
    as_f32 = decode_payload(
        _encode(key, latents, dtype=torch.float32), expected=_expect(key, dtype=torch.float32)
    )
    assert torch.equal(as_f32.latents, latents)


def test_payload_is_read_without_torch_load_or_pickle(monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("payloads must never be unpickled")

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    key = prefix_key(**BASE)
    assert decode_payload(_encode(key), expected=_expect(key)).n_latents == 4


def _raw_payload(key: str, tensor: torch.Tensor, **metadata: str) -> bytes:
    meta = {
        "format": "deliberate-latents",
        "format_version": str(FORMAT_VERSION),
        "key": key,
        "decoder_fp": "dec",
        "coprocessor_fp": "cop",
        "prefix_len": "3",
        "n_latents": str(tensor.shape[0]),
        "hidden": str(tensor.shape[-1]),
        "dtype": "bfloat16",
        "created_at": "0.0",
        "sha256": hashlib.sha256(_tensor_bytes(tensor)).hexdigest(),
    }
    meta.update(metadata)
    return st_save({"latents": tensor}, metadata=meta)


@pytest.mark.parametrize(
    ("build", "reason"),
    [
        (lambda k: _raw_payload(k, torch.full((4, 8), float("nan"), dtype=torch.bfloat16)),
         "non_finite"),
        (lambda k: _raw_payload(k, torch.zeros(4, 8, dtype=torch.bfloat16), format_version="99"),
         "format"),
        (lambda k: _raw_payload(k, torch.zeros(4, 8, dtype=torch.bfloat16), prefix_len="4"),
         "prefix_len_mismatch"),
        (lambda k: _raw_payload(k, torch.zeros(4, 8, dtype=torch.bfloat16), dtype="float16"),
         "dtype"),
        (lambda k: _raw_payload(k, torch.zeros(4, 8, dtype=torch.bfloat16), n_latents="5"),
         "shape"),
        (lambda k: _raw_payload(k, torch.zeros(2, 4, 4, dtype=torch.bfloat16), n_latents="2"),
         "shape"),
        (lambda k: _raw_payload(k, torch.zeros(4, 8, dtype=torch.bfloat16), sha256="0" * 64),
         "digest_mismatch"),
        (lambda k: st_save({"latents": torch.zeros(4, 8, dtype=torch.bfloat16)}), "format"),
        (lambda k: st_save({"latents": torch.zeros(4, 8), "extra": torch.zeros(1)},
                           metadata={"format": "deliberate-latents"}), "format"),
        (lambda k: struct.pack("<Q", 2**40) + b"{}", "corrupt"),
        (lambda k: b"", "corrupt"),
    ],
)  # fmt: skip
def test_decode_rejects_with_a_reason(build: object, reason: str) -> None:
    key = prefix_key(**BASE)
    with pytest.raises(PayloadRejected) as excinfo:
        decode_payload(build(key), expected=_expect(key))  # type: ignore[operator]
    assert excinfo.value.reason == reason


def test_encode_refuses_bad_latents() -> None:
    key = prefix_key(**BASE)
    with pytest.raises(ValueError, match="NaN"):
        _encode(key, torch.tensor([[1.0, float("inf")]]))
    with pytest.raises(ValueError, match="shape"):
        _encode(key, torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="dtype"):
        _encode(key, dtype=torch.int8)


def _resave(data: bytes, **changes: str) -> bytes:
    """The same tensor with some metadata rewritten, as a Redis writer could store it."""
    (header_len,) = struct.unpack("<Q", data[:8])
    meta = json.loads(data[8 : 8 + header_len])["__metadata__"] | changes
    return st_save(
        {"latents": decode_payload(data, expected=_expect(meta["key"])).latents}, metadata=meta
    )


def test_a_signed_payload_is_read_only_with_its_secret() -> None:
    key = prefix_key(**BASE)
    secret = b"s" * 32
    signed = _encode(key, secret=secret)
    assert decode_payload(signed, expected=_expect(key, secret=secret)).key == key
    # A reader without the secret ignores the MAC (workers sign before servers verify).
    assert decode_payload(signed, expected=_expect(key)).key == key
    forgeries = {
        "unsigned": _encode(key),
        "signed with another secret": _encode(key, secret=b"t" * 32),
        # Valid digest and fields, metadata changed after signing: the MAC covers it all.
        "metadata changed": _resave(
            signed, value_delta="-1.0", value_std_error="0.1", value_tokens="16"
        ),
        "MAC not ASCII": _resave(signed, mac="\u00e9" * 64),
    }
    for name, data in forgeries.items():
        with pytest.raises(PayloadRejected) as excinfo:
            decode_payload(data, expected=_expect(key, secret=secret))
        assert excinfo.value.reason == "mac_mismatch", name
    assert "sss" not in repr(_expect(key, secret=secret))  # never in a log line
