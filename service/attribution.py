"""Signed attribution tokens: what served a request, carried by the client instead of Redis.

The score response's `attribution` field is a token that the client's events bring back under
the same name. It proves, with nothing stored per request on the server:

    kid . header . tags . mac        (each part base64url, no padding)

- header: JSON [version, request id, experiment, arm, model version, user id, day, ts,
  holdout]; `ts` (epoch seconds) and its UTC `day` are the request's time by the scorer's
  clock (or the request's own `ts` under `clock="client"`), the day it is counted under;
- tags: 4 bytes per returned item, in the order returned: a pseudo-random function of the item
  id under a key secret to the scorers and particular to the request, so an event proves each
  item it names was served without the token listing the ids; a client cannot make a tag for
  an item it was not served (one guess in 2^32 / items per try, and online only). Version 2
  (issued now): AES-128 under the key's AES key of the item id's BLAKE2b-128 digest xor a mask
  (BLAKE2b-128 of the request id keyed by the key), the first 4 bytes of each block: one cipher
  call for all items, where version 1 (still verified, for tokens issued before) took a keyed
  BLAKE2b per item, 0.3-0.5 µs each in Python;
- mac: HMAC-SHA256 (first 16 bytes) of "kid.header.tags" under the key named by kid.

Keys come from `CTRSERVE_ATTRIBUTION_KEYS` ("kid:secret,kid:secret"): the first signs, every
one verifies, so a key rotates without downtime (add the new one second on every replica, then
first, then drop the old one once the attribution window has passed). Without configured keys
the replicas sharing a Redis share a random key kept there (`ctrserve:attribution:key`).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from pydantic_core import to_json

TAG_BYTES = 4
MAC_BYTES = 16
AUTO_KID = "auto"
VERSION = 2  # of the tokens issued; 1 and 2 are verified
DIGESTS_KEPT = 100_000  # item-id digests cached for version 2's tags (about 13 MB at most)


class TokenError(ValueError):
    """An attribution token that does not verify; `reason` is the event's rejection reason."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


@dataclass(frozen=True)
class Claims:
    request_id: str
    experiment: str
    arm: str
    model_version: str
    user: str
    day: str
    ts: float
    holdout: bool
    tags: bytes  # TAG_BYTES per returned item, in the order returned
    version: int = VERSION

    @property
    def served(self) -> int:
        return len(self.tags) // TAG_BYTES

    def has_tag(self, tag: bytes) -> bool:
        return any(self.tags[i : i + TAG_BYTES] == tag
                   for i in range(0, len(self.tags), TAG_BYTES))


def item_digest(item_id: str) -> bytes:
    """An item id's BLAKE2b-128 digest: what version 2's tag of the item encrypts."""
    return hashlib.blake2b(item_id.encode(), digest_size=16, person=b"ctrserve-item").digest()


def new_request_id() -> str:
    """128 random bits (the issue asks for at least 96): not guessable, not a counter."""
    return base64.urlsafe_b64encode(os.urandom(16)).rstrip(b"=").decode()


def utc_day(ts: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(ts))


def parse_keys(spec: list[str]) -> list[tuple[str, bytes]]:
    """["kid:secret", ...] -> [(kid, secret)]; a secret shorter than 16 bytes is refused."""
    keys = []
    for entry in spec:
        kid, sep, secret = entry.strip().partition(":")
        if not sep or not kid or "." in kid:
            raise ValueError(f"attribution key {kid or entry!r}: expected 'kid:secret' with a "
                             "kid free of '.'")
        if len(secret) < 16:
            raise ValueError(f"attribution key {kid!r}: the secret needs at least 16 "
                             "characters")
        keys.append((kid, secret.encode()))
    return keys


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class Signer:
    """Issues and verifies tokens with `keys` [(kid, secret)], the first one signing."""

    def __init__(self, keys: list[tuple[str, bytes]]):
        if not keys:
            raise ValueError("at least one attribution key is needed")
        self.kid = keys[0][0]
        self._macs = {kid: hmac.new(secret, digestmod=hashlib.sha256) for kid, secret in keys}
        self._tag_keys = {kid: hashlib.blake2b(secret, digest_size=64, person=b"ctrserve-tag")
                          .digest() for kid, secret in keys}
        self._aes_keys = {kid: hashlib.blake2b(key, digest_size=16, person=b"ctrserve-aes")
                          .digest() for kid, key in self._tag_keys.items()}
        self._local = threading.local()  # the encryptors, which are not shared across threads
        self._digest_cache: dict[str, bytes] = {}

    def tags(self, kid: str, request_id: str, items: list[str], version: int = VERSION,
             digests: np.ndarray | None = None) -> bytes:
        """TAG_BYTES per item, in order, under key `kid` for the request (token `version`).
        `digests`: the items' item_digest, one uint8 row of 16 each, when the caller has them
        (the scorer's item cache keeps them), else looked up here."""
        if version == 1:
            return self._blake2b_tags(kid, request_id, items)
        # XE (Rogaway, 2004): AES_K(digest(item) xor mask), the mask secret and particular to
        # the request; ECB is AES applied block by block, as a pseudo-random permutation
        mask = hashlib.blake2b(request_id.encode(), digest_size=16, key=self._tag_keys[kid],
                               person=b"ctrserve-mask").digest()
        blocks = (np.frombuffer(self._digests(items), np.uint64).reshape(-1, 2)
                  if digests is None else digests.view(np.uint64))
        masked = blocks ^ np.frombuffer(mask, np.uint64)
        blocks = self._encryptor(kid).update(masked.tobytes())
        return np.frombuffer(blocks, np.uint32)[::4].tobytes()  # each block's first TAG_BYTES (4)

    def _encryptor(self, kid: str) -> Any:
        """This thread's AES-ECB encryptor under kid's key: made once (about 10 µs each)."""
        made = self._local.__dict__
        if kid not in made:
            made[kid] = Cipher(algorithms.AES(self._aes_keys[kid]), modes.ECB()).encryptor()
        return made[kid]

    def _digests(self, items: list[str]) -> bytes:
        """The items' BLAKE2b-128 digests, concatenated; the cache stays bounded by clearing."""
        cache = self._digest_cache
        try:
            return b"".join(map(cache.__getitem__, items))
        except KeyError:
            if len(cache) + len(items) > DIGESTS_KEPT:
                cache.clear()
            for item in items:
                cache[item] = item_digest(item)
            return b"".join(map(cache.__getitem__, items))

    def _blake2b_tags(self, kid: str, request_id: str, items: list[str]) -> bytes:
        salt = hashlib.blake2b(request_id.encode(), digest_size=16).digest()
        base = hashlib.blake2b(digest_size=TAG_BYTES, key=self._tag_keys[kid], salt=salt)
        out = []
        for item in items:
            h = base.copy()
            h.update(item.encode())
            out.append(h.digest())
        return b"".join(out)

    def issue(self, request_id: str, experiment: str, arm: str, model_version: str, user: str,
              ts: float, holdout: bool, items: list[str], day: str | None = None,
              digests: np.ndarray | None = None) -> str:
        """A token for the request; `day` is utc_day(ts), computed here when not given;
        `digests` as for `tags`."""
        header = to_json([VERSION, request_id, experiment, arm, model_version, user,
                          day or utc_day(ts), ts, int(holdout)])
        tags = self.tags(self.kid, request_id, items, digests=digests)
        body = f"{self.kid}.{_b64(header)}.{_b64(tags)}"
        return f"{body}.{_b64(self._mac(self.kid, body))}"

    def verify(self, token: str) -> tuple[str, Claims]:
        """(kid, claims) of a token this signer's keys made; TokenError otherwise."""
        parts = token.split(".")
        if len(parts) != 4:
            raise TokenError("bad_token", "not an attribution token from a score response")
        kid, header, tags, mac = parts
        if kid not in self._macs:
            raise TokenError("bad_token", f"signed with an unknown key {kid!r} (rotated out?)")
        try:
            given = _unb64(mac)
            fields = json.loads(_unb64(header))
            raw_tags = _unb64(tags)
        except (ValueError, json.JSONDecodeError):
            raise TokenError("bad_token", "the token is not valid base64url/JSON") from None
        if not hmac.compare_digest(given, self._mac(kid, f"{kid}.{header}.{tags}")):
            raise TokenError("bad_signature", "the token's signature does not match: it was "
                             "altered or not made by this service")
        return kid, _claims(fields, raw_tags)

    def _mac(self, kid: str, body: str) -> bytes:
        mac = self._macs[kid].copy()  # keyed once: a copy costs less than keying anew
        mac.update(body.encode())
        return mac.digest()[:MAC_BYTES]


def _claims(fields: Any, tags: bytes) -> Claims:
    version, rid, experiment, arm, model_version, user, day, ts, holdout = fields
    if version not in (1, 2):  # signed by us, so only a future format can get here
        raise TokenError("bad_token", f"token format {version} is not known to this scorer")
    return Claims(rid, experiment, arm, model_version, user, day, float(ts), bool(holdout),
                  tags, version)
