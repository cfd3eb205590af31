"""The tensor digest: what a delta's stored tensors must hash to, recorded in its manifest.

The fingerprint (``models/fingerprint.py``) says which base weights a delta was solved for;
this digest says the delta's own tensor data is what its writer wrote. It is a sha256 over
every stored tensor in order of name (Unicode code points), each contributing one line of
JSON ``[name, dtype, shape, byte count]`` followed by its exact bytes as stored in the file
(safetensors dtype names, little-endian data). Offsets, padding and the header's key order do
not enter it, so the digest of a file is computed from its data section alone and the writer
(:func:`vllm_safety_patch.delta.io.encode_delta`) and every reader
(:func:`vllm_safety_patch.delta.io.read_delta`) compute it with this one function.

It detects damage and edits made without vsp; it is not a signature: whoever can rewrite a
file can also rewrite its digest.
"""

from __future__ import annotations

import hashlib
import json

from vllm_safety_patch.delta.header import SafetensorsHeader

DIGEST_VERSION = "vsp-tensors-v1"


def tensors_digest(header: SafetensorsHeader, blob: bytes | bytearray | memoryview) -> str:
    """sha256 of the tensors ``header`` describes, read from the file bytes ``blob``."""
    data = memoryview(blob)[header.data_start :]
    hasher = hashlib.sha256(f"{DIGEST_VERSION}\n".encode())
    for name in sorted(header.tensors):
        entry = header.tensors[name]
        record = [name, entry.dtype, list(entry.shape), entry.end - entry.start]
        hasher.update(json.dumps(record).encode() + b"\n")
        hasher.update(data[entry.start : entry.end])
    return hasher.hexdigest()
