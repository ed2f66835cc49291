"""The payload: latents of one prefix as safetensors bytes with verifiable metadata (DESIGN §3).

Layout: one tensor named `latents`, shape [n_latents, hidden], bf16 by default; string
metadata holding the format version, the key, both fingerprints, the prefix length, the
shape, the dtype, the creation time and the SHA-256 of the tensor's raw bytes; with a shared
secret, also `mac`: an HMAC-SHA256 of all the other metadata (which binds the tensor bytes
through their SHA-256), so that a Redis writer without the secret cannot forge latents.

Readers verify every field against what they expect and reject anything else with
`PayloadRejected(reason)`. Parsing goes through safetensors only (never torch.load, never
pickle): a payload is data from the network and must not be able to run code.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import struct
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from cache_store.errors import PayloadRejected
from cache_store.keys import FORMAT_VERSION, validate_key
from cache_store.types import Job
from cache_store.value import ValueFigure

FORMAT_NAME = "deliberate-latents"
TENSOR_NAME = "latents"
DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.bfloat16: "bfloat16",
    torch.float16: "float16",
    torch.float32: "float32",
}
# A safetensors header is a few hundred bytes here; a huge declared length is corruption
# and must not make the reader allocate it.
_MAX_HEADER_BYTES = 64 * 1024

# Rejection reasons: short, stable labels of deliberate_store_payload_rejected_total.
CORRUPT = "corrupt"
FORMAT = "format"
KEY_MISMATCH = "key_mismatch"
FINGERPRINT_MISMATCH = "fingerprint_mismatch"
PREFIX_LEN_MISMATCH = "prefix_len_mismatch"
DTYPE = "dtype"
SHAPE = "shape"
DIGEST_MISMATCH = "digest_mismatch"
NON_FINITE = "non_finite"
TOO_LARGE = "too_large"
NORM = "norm_out_of_range"
MAC = "mac_mismatch"

MAC_FIELD = "mac"
# Keeps this MAC from being valid for anything else the same secret might ever sign.
_MAC_DOMAIN = b"deliberate-payload-mac\0"


@dataclass(frozen=True, slots=True)
class PayloadExpectation:
    """What a reader knows a payload for `key` must be. None fields are not checked."""

    key: str
    decoder_fp: str
    coprocessor_fp: str
    prefix_len: int
    n_latents: int | None = None
    hidden: int | None = None
    dtype: torch.dtype | None = torch.bfloat16
    cast_to: torch.dtype | None = None
    """The dtype the reader will use the latents in: they must stay finite after the cast
    (an fp32 3.4e38 is finite, and Inf in fp16)."""
    max_latent_norm: float | None = None
    """Largest L2 norm allowed for any one latent (row), in the cast dtype."""
    secret: bytes | None = field(default=None, repr=False)
    """The shared payload secret: the payload must carry a valid `mac`. None: not checked
    (a `mac` present is ignored, so workers can start signing before servers verify)."""

    @classmethod
    def for_job(
        cls,
        job: Job,
        *,
        n_latents: int | None = None,
        hidden: int | None = None,
        dtype: torch.dtype | None = None,
    ) -> PayloadExpectation:
        return cls(
            key=job.key,
            decoder_fp=job.decoder_fp,
            coprocessor_fp=job.coprocessor_fp,
            prefix_len=job.prefix_len,
            n_latents=n_latents,
            hidden=hidden,
            dtype=dtype,
        )


@dataclass(frozen=True, slots=True)
class Payload:
    latents: torch.Tensor
    key: str
    decoder_fp: str
    coprocessor_fp: str
    prefix_len: int
    n_latents: int
    hidden: int
    dtype: torch.dtype
    created_at: float
    sha256: str
    format_version: int
    nbytes: int
    """Size of the encoded payload."""
    value: ValueFigure | None = None
    """The worker's value-check figure of these latents, if it measured one."""


# Exponent bits of each float format: a value is NaN or Inf exactly when they are all set.
_EXPONENT_MASKS: dict[str, tuple[np.dtype[Any], int]] = {
    "bfloat16": (np.dtype("<u2"), 0x7F80),
    "float16": (np.dtype("<u2"), 0x7C00),
    "float32": (np.dtype("<u4"), 0x7F800000),
}


def _all_finite(raw: memoryview, dtype_name: str) -> bool:
    # On the raw bits with numpy: faster than torch.isfinite on bf16, and this check runs
    # on the request path.
    unsigned, mask = _EXPONENT_MASKS[dtype_name]
    bits = np.frombuffer(raw, dtype=unsigned)
    return not bool(((bits & mask) == mask).any())


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    # Reinterpret as bytes so bf16 (which numpy lacks) hashes exactly as safetensors stores it.
    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _mac(secret: bytes, meta: dict[str, str]) -> str:
    """HMAC-SHA256 of every metadata field but the MAC itself, in a canonical order."""
    fields = {name: value for name, value in meta.items() if name != MAC_FIELD}
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()
    return hmac.new(secret, _MAC_DOMAIN + canonical, hashlib.sha256).hexdigest()


def encode_payload(
    latents: torch.Tensor,
    *,
    key: str,
    decoder_fp: str,
    coprocessor_fp: str,
    prefix_len: int,
    dtype: torch.dtype = torch.bfloat16,
    created_at: float | None = None,
    value: ValueFigure | None = None,
    secret: bytes | None = None,
) -> bytes:
    """Serialize latents [n_latents, hidden] (cast to `dtype`, bf16 by default), with the
    value check's figure of them when the worker measured one, signed with `secret` if
    given."""
    validate_key(key)
    if latents.dim() != 2 or latents.shape[0] == 0 or latents.shape[1] == 0:
        raise ValueError(f"latents must have shape [n_latents, hidden], got {tuple(latents.shape)}")
    if dtype not in DTYPE_NAMES:
        raise ValueError(f"payload dtype must be one of {list(DTYPE_NAMES.values())}, not {dtype}")
    if prefix_len <= 0:
        raise ValueError(f"prefix_len must be positive, got {prefix_len}")
    tensor = latents.detach().to(device="cpu", dtype=dtype).contiguous()
    if not bool(torch.isfinite(tensor).all()):
        raise ValueError("latents contain NaN or Inf; refusing to publish them")
    metadata = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "key": key,
        "decoder_fp": decoder_fp,
        "coprocessor_fp": coprocessor_fp,
        "prefix_len": str(prefix_len),
        "n_latents": str(tensor.shape[0]),
        "hidden": str(tensor.shape[1]),
        "dtype": DTYPE_NAMES[dtype],
        "created_at": repr(time.time() if created_at is None else created_at),
        "sha256": hashlib.sha256(_tensor_bytes(tensor)).hexdigest(),
    }
    if value is not None:
        metadata |= {
            "value_delta": repr(value.delta),
            "value_std_error": repr(value.std_error),
            "value_tokens": str(value.tokens),
        }
    if secret is not None:
        metadata[MAC_FIELD] = _mac(secret, metadata)
    return st_save({TENSOR_NAME: tensor}, metadata=metadata)


def _read_value(meta: dict[str, str]) -> ValueFigure | None:
    if "value_delta" not in meta:
        return None
    try:
        figure = ValueFigure(
            float(_require(meta, "value_delta")),
            float(_require(meta, "value_std_error")),
            _require_int(meta, "value_tokens"),
        )
    except ValueError as exc:
        raise PayloadRejected(FORMAT, "metadata field 'value_*' is not a number") from exc
    if not (np.isfinite(figure.delta) and np.isfinite(figure.std_error)):
        raise PayloadRejected(FORMAT, "the value-check figure is not finite")
    return figure


def _read_header(data: bytes) -> tuple[dict[str, Any], int]:
    """The safetensors JSON header and where the tensor bytes start."""
    if len(data) < 8:
        raise PayloadRejected(CORRUPT, f"{len(data)} bytes is too short for a safetensors header")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > _MAX_HEADER_BYTES or 8 + header_len > len(data):
        raise PayloadRejected(
            CORRUPT, f"header length {header_len} does not fit in {len(data)} bytes (truncated?)"
        )
    try:
        header = json.loads(data[8 : 8 + header_len])
    except (ValueError, RecursionError) as exc:  # not UTF-8, not JSON, nested too deep
        raise PayloadRejected(CORRUPT, f"header is not JSON: {str(exc)[:200]}") from exc
    if not isinstance(header, dict):
        raise PayloadRejected(CORRUPT, "header is not a JSON object")
    return header, 8 + header_len


def _require(meta: dict[str, str], name: str) -> str:
    value = meta.get(name)
    if not isinstance(value, str):
        raise PayloadRejected(FORMAT, f"metadata field {name!r} is missing")
    return value


def _require_int(meta: dict[str, str], name: str) -> int:
    try:
        return int(_require(meta, name))
    except ValueError as exc:
        raise PayloadRejected(FORMAT, f"metadata field {name!r} is not an integer") from exc


def _check_mac(meta: dict[str, Any], secret: bytes) -> None:
    """Before anything else is read: latents from a writer without the secret are not
    parsed at all."""
    if not all(isinstance(value, str) for value in meta.values()):
        raise PayloadRejected(FORMAT, "metadata values must be strings")
    found = meta.get(MAC_FIELD)
    if found is None:
        raise PayloadRejected(MAC, "payload is not signed, and this reader requires a MAC")
    # Bytes, not str: compare_digest refuses non-ASCII str, and the field is untrusted.
    given = found.encode("utf-8", "replace")
    if not hmac.compare_digest(given, _mac(secret, meta).encode()):
        raise PayloadRejected(MAC, "payload MAC does not match (written without the secret?)")


def _check_identity(meta: dict[str, str], expected: PayloadExpectation) -> None:
    if _require(meta, "format") != FORMAT_NAME:
        raise PayloadRejected(FORMAT, f"format is {meta['format']!r}, not {FORMAT_NAME!r}")
    version = _require_int(meta, "format_version")
    if version != FORMAT_VERSION:
        raise PayloadRejected(
            FORMAT, f"format version {version}, this reader reads {FORMAT_VERSION}"
        )
    if _require(meta, "key") != expected.key:
        raise PayloadRejected(KEY_MISMATCH, f"payload is for key {meta['key']}, not {expected.key}")
    for name in ("decoder_fp", "coprocessor_fp"):
        found, want = _require(meta, name), getattr(expected, name)
        if found != want:
            raise PayloadRejected(FINGERPRINT_MISMATCH, f"{name} is {found}, expected {want}")
    prefix_len = _require_int(meta, "prefix_len")
    if prefix_len != expected.prefix_len:
        raise PayloadRejected(
            PREFIX_LEN_MISMATCH, f"prefix length {prefix_len}, expected {expected.prefix_len}"
        )


def _check_tensor(
    meta: dict[str, str], latents: torch.Tensor, expected: PayloadExpectation
) -> None:
    dtype_name = _require(meta, "dtype")
    if DTYPE_NAMES.get(latents.dtype) != dtype_name:
        raise PayloadRejected(DTYPE, f"tensor is {latents.dtype}, metadata says {dtype_name}")
    if expected.dtype is not None and latents.dtype != expected.dtype:
        raise PayloadRejected(DTYPE, f"tensor is {latents.dtype}, expected {expected.dtype}")
    shape = tuple(latents.shape)
    declared = (_require_int(meta, "n_latents"), _require_int(meta, "hidden"))
    if len(shape) != 2 or shape != declared:
        raise PayloadRejected(SHAPE, f"tensor shape {shape}, metadata says {declared}")
    want = (expected.n_latents or shape[0], expected.hidden or shape[1])
    if shape != want:
        raise PayloadRejected(SHAPE, f"tensor shape {shape}, expected {want}")


def _check_magnitude(latents: torch.Tensor, expected: PayloadExpectation) -> None:
    """Finite in the dtype the reader uses, and no latent longer than the bound: a payload
    that passed every other check (a hostile or buggy writer computed its digest) must
    still not hand the decoder Inf or values far outside what the coprocessor produces."""
    if expected.cast_to is None and expected.max_latent_norm is None:
        return
    cast = latents if expected.cast_to is None else latents.to(expected.cast_to)
    if not bool(torch.isfinite(cast).all()):
        raise PayloadRejected(NON_FINITE, f"latents overflow to Inf as {cast.dtype}")
    if expected.max_latent_norm is not None:
        # float64: the norm of finite bf16/fp32 rows cannot overflow there.
        longest = float(cast.to(torch.float64).norm(dim=-1).max())
        if not longest <= expected.max_latent_norm:
            raise PayloadRejected(
                NORM,
                f"a latent has L2 norm {longest:.4g}, over the bound "
                f"{expected.max_latent_norm:.4g} (latent_norm_max)",
            )


def decode_payload(data: bytes, *, expected: PayloadExpectation) -> Payload:
    """Parse and verify a payload; raise PayloadRejected(reason) on any mismatch."""
    header, data_start = _read_header(data)
    meta = header.get("__metadata__")
    if not isinstance(meta, dict):
        raise PayloadRejected(FORMAT, "no metadata: not a Deliberate payload")
    tensors = [name for name in header if name != "__metadata__"]
    if tensors != [TENSOR_NAME]:
        raise PayloadRejected(FORMAT, f"expected one tensor {TENSOR_NAME!r}, found {tensors}")
    if expected.secret is not None:
        _check_mac(meta, expected.secret)
    _check_identity(meta, expected)
    try:
        latents = st_load(data)[TENSOR_NAME]
    except (SafetensorError, ValueError, RuntimeError, KeyError) as exc:
        raise PayloadRejected(CORRUPT, f"safetensors could not read the tensor: {exc}") from exc
    _check_tensor(meta, latents, expected)
    begin, end = header[TENSOR_NAME]["data_offsets"]
    raw = memoryview(data)[data_start + begin : data_start + end]
    digest = hashlib.sha256(raw).hexdigest()
    if digest != _require(meta, "sha256"):
        raise PayloadRejected(DIGEST_MISMATCH, "tensor bytes do not match their recorded sha256")
    if not _all_finite(raw, DTYPE_NAMES[latents.dtype]):
        raise PayloadRejected(NON_FINITE, "latents contain NaN or Inf")
    _check_magnitude(latents, expected)
    try:
        created_at = float(_require(meta, "created_at"))
    except ValueError as exc:
        raise PayloadRejected(FORMAT, "metadata field 'created_at' is not a number") from exc
    return Payload(
        latents=latents,
        key=expected.key,
        decoder_fp=expected.decoder_fp,
        coprocessor_fp=expected.coprocessor_fp,
        prefix_len=expected.prefix_len,
        n_latents=latents.shape[0],
        hidden=latents.shape[1],
        dtype=latents.dtype,
        created_at=created_at,
        sha256=digest,
        format_version=FORMAT_VERSION,
        nbytes=len(data),
        value=_read_value(meta),
    )
