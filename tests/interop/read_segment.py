#!/usr/bin/env python3
"""An independent reader of IronClaw segments, written from SECURITY.md alone.

It derives the session's keys from the master key with HKDF-SHA256 (Python's hmac),
opens the segment with SQLCipher 4 (the sqlcipher3 package) and opens every row with
libsodium's XChaCha20-Poly1305 (PyNaCl). It prints one JSON object per item.

usage: read_segment.py MASTER_HEX SALT_HEX SESSION DIRECTION SEQ PATH
Exit status: 0 on success, 1 if the segment cannot be opened with these keys.
"""

import hashlib
import hmac
import json
import sys

import sqlcipher3
from nacl.bindings import crypto_aead_xchacha20poly1305_ietf_decrypt
from nacl.exceptions import CryptoError


def hkdf_sha256(salt: bytes, ikm: bytes, info: bytes, length: int = 32) -> bytes:
    prk = hmac.new(salt, ikm, hashlib.sha256).digest()
    out, block, counter = b"", b"", 1
    while len(out) < length:
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        out += block
        counter += 1
    return out[:length]


def short(field: bytes) -> bytes:
    return bytes([len(field)]) + field


def associated_data(session: str, direction: str, seq: int, index: int, kind: str) -> bytes:
    return (
        b"ironclaw/v1/envelope\x00"
        + short(session.encode())
        + short(direction.encode())
        + seq.to_bytes(8, "big")
        + index.to_bytes(4, "big")
        + short(kind.encode())
    )


def main() -> int:
    master_hex, salt_hex, session, direction, seq, path = sys.argv[1:7]
    master, salt, seq = bytes.fromhex(master_hex), bytes.fromhex(salt_hex), int(seq)
    db_key = hkdf_sha256(salt, master, f"ironclaw/v1/{direction}-db/{session}".encode())
    env_key = hkdf_sha256(salt, master, f"ironclaw/v1/{direction}-envelope/{session}".encode())

    conn = sqlcipher3.connect(f"file:{path}?mode=ro", uri=True)
    conn.execute(f"PRAGMA key = \"x'{db_key.hex()}'\"")
    try:
        header = conn.execute(
            "SELECT format, session, direction, seq, item_count FROM segment"
        ).fetchone()
    except sqlcipher3.DatabaseError as e:
        print(f"cannot open segment: {e}", file=sys.stderr)
        return 1
    if header != (1, session, direction, seq, header[4]):
        print(f"segment header does not match: {header}", file=sys.stderr)
        return 1
    rows = conn.execute("SELECT idx, kind, sealed FROM items ORDER BY idx").fetchall()
    for index, kind, sealed in rows:
        aad = associated_data(session, direction, seq, index, kind)
        try:
            plain = crypto_aead_xchacha20poly1305_ietf_decrypt(sealed[24:], aad, sealed[:24], env_key)
        except CryptoError:
            print(f"row {index} failed authentication", file=sys.stderr)
            return 1
        print(json.dumps({"index": index, "kind": kind, "item": json.loads(plain)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
