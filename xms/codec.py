"""Optional encryption of every Temporal payload (AES-256-GCM), keyed by XMS_PAYLOAD_KEY.

With a key set, workflow inputs, results, heartbeats, queries and updates reach the Temporal
server — and its history, visibility and Web UI — as ciphertext: no source paths, volume ids or
project names in clear. Clients and workers need the same key; without it they read nothing.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import os
from collections.abc import Sequence

from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from temporalio.api.common.v1 import Payload
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.converter import DataConverter, PayloadCodec

from xms.errors import ConfigInvalid

ENCODING = b"binary/encrypted"


def parse_key(text: str) -> bytes:
    """32 bytes, given as 64 hex digits or base64."""
    t = text.strip()
    try:
        key = bytes.fromhex(t) if len(t) == 64 else base64.b64decode(t, validate=True)
    except ValueError:
        key = b""
    if len(key) != 32:
        raise ConfigInvalid("XMS_PAYLOAD_KEY must be 32 bytes, as 64 hex digits or base64 "
                            "(e.g. the output of `openssl rand -hex 32`)")
    return key


class EncryptionCodec(PayloadCodec):
    def __init__(self, key: bytes):
        self.aead = AESGCM(key)
        self.key_id = hashlib.sha256(key).hexdigest()[:16].encode()  # names the key, reveals nothing

    async def encode(self, payloads: Sequence[Payload]) -> list[Payload]:
        out = []
        for p in payloads:
            nonce = os.urandom(12)
            out.append(Payload(metadata={"encoding": ENCODING, "encryption-key-id": self.key_id},
                               data=nonce + self.aead.encrypt(nonce, p.SerializeToString(), None)))
        return out

    async def decode(self, payloads: Sequence[Payload]) -> list[Payload]:
        out = []
        for p in payloads:
            if p.metadata.get("encoding") != ENCODING:
                out.append(p)
                continue
            if p.metadata.get("encryption-key-id") != self.key_id:
                raise ValueError("payload was encrypted with another XMS_PAYLOAD_KEY")
            plain = self.aead.decrypt(p.data[:12], p.data[12:], None)
            out.append(Payload.FromString(plain))
        return out


def data_converter(payload_key: str | None) -> DataConverter:
    if not payload_key:
        return pydantic_data_converter
    return dataclasses.replace(pydantic_data_converter, payload_codec=EncryptionCodec(parse_key(payload_key)))
