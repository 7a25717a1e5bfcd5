"""Connected Attentive accounts ("authorizations"): a label, a description and an encrypted API key.

Why validate when saving: an operator who pastes a wrong key should hear it at once, with a clear
message, rather than from a paused export job later. :meth:`AuthorizationStore.create` calls
``GET /v2/me`` first and stores nothing unless Attentive accepts the key; the company name it returns is
kept for display.

What ``/me`` cannot tell: it does not report the key's permissions or scopes (CONTRACT.md §3). A key
without *Custom Attributes* / *Subscribers* write access passes ``/me`` and only fails with 403 on the
first bulk write, which pauses the export job with a clear status (DESIGN.md §4). ``/me`` is not sent
through the shared rate limiter: it is a different endpoint from the bulk ones and runs once per save.

Secrets (DESIGN.md invariant 5): the API key is encrypted with Fernet (:mod:`worker.setup.crypto`) before it
touches Redis, and leaves the store in plaintext only through :meth:`AuthorizationStore.api_key`. The
:class:`Authorization` model holds the ciphertext out of ``repr``/``str``/``model_dump``; listings show
a masked hint (``••••3f9a``). Exceptions and log lines never carry the key.

Storage: one Redis hash, ``keys.authorizations()``, id → JSON record. The label is unique (compared
case-insensitively); uniqueness is enforced with an optimistic ``WATCH``/``MULTI`` on that one key, so it
holds with concurrent writers and stays on one Redis Cluster slot.
"""

from __future__ import annotations

import builtins
import json
import logging
import re
import secrets
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from typing import Any, TypeVar

import redis
from pydantic import BaseModel, ConfigDict, Field

from worker.clients.attentive import (
    AttentiveClient,
    AttentiveError,
    Forbidden,
    RateLimited,
    ServerError,
    TransportError,
    Unauthorized,
)
from worker.setup.crypto import Cipher, SecretKeyError, SecretKeyInvalid, SecretKeyMismatch, SecretKeyMissing
from worker.store import keys
from worker.store.ratelimit import api_key_hash
from worker.store.replies import text

logger = logging.getLogger(__name__)

#: Longest label and description accepted; labels are shown in tables and CLI arguments.
MAX_LABEL_LENGTH = 100
MAX_DESCRIPTION_LENGTH = 1000
#: Optimistic-transaction retries before giving up (writers are operators, so contention is rare).
_MAX_TRANSACTION_ATTEMPTS = 20
_T = TypeVar("_T")
#: Mask in front of the visible key suffix.
MASK = "••••"
#: Ids look like ``au_3f9a0c1d2e4b``; labels may not, so an id or label argument is never ambiguous.
_ID_PATTERN = re.compile(r"^au_[0-9a-f]{12}$")


class AuthorizationError(Exception):
    """Base of the errors this module raises; ``str(exc)`` is safe to show to an operator."""


class AuthorizationRejected(AuthorizationError):
    """The API key was not accepted (Attentive refused it, or it could not be checked). Nothing stored.

    Attributes:
        status_code: the HTTP status Attentive answered, or None when no answer arrived.
    """

    def __init__(self, message: str, *, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code


class AuthorizationNotFound(AuthorizationError):
    """No authorization has that id or label."""


class AuthorizationInvalid(AuthorizationError, ValueError):
    """The label, description or key is malformed, or the label is already taken."""


class Authorization(BaseModel):
    """One connected Attentive account. Safe to print, log and dump: the key is not in it in plaintext,
    and the ciphertext is excluded from ``repr`` and ``model_dump``."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    id: str
    label: str
    description: str = ""
    #: ``companyName`` from ``/v2/me`` when the key was saved (None if Attentive did not say).
    company_name: str | None = None
    created_at: datetime
    #: Masked suffix of the key, e.g. ``••••3f9a``: enough to tell keys apart, never more than 4 chars.
    key_hint: str
    #: :func:`worker.store.ratelimit.api_key_hash` of the key: names its shared rate limiter without decrypting.
    key_hash: str
    #: Fernet token of the API key. Only the store reads it.
    encrypted_key: str = Field(repr=False, exclude=True)


def key_hint(api_key: str) -> str:
    """Masked suffix for display: at most the last 4 characters, fewer for short keys (a quarter)."""
    visible = min(4, len(api_key) // 4)
    return MASK + (api_key[-visible:] if visible else "")


def _parse_all(raw: Mapping[Any, bytes | str]) -> list[Authorization]:
    return [Authorization.model_validate_json(text(v)) for v in raw.values()]


def _check_label_free(label: str, records: Iterable[Authorization]) -> None:
    folded = label.casefold()
    for record in records:
        if record.label.casefold() == folded:
            raise AuthorizationInvalid(
                f"an authorization labelled {record.label!r} already exists (id {record.id}); "
                "choose another label or delete that one first"
            )


class AuthorizationStore:
    """Create, read, list and delete authorizations in Redis.

    Args:
        redis: any client (``decode_responses`` either way).
        secret_key: ``EXPORT_SECRET_KEY`` (one Fernet key, or several comma-separated for rotation).
            A malformed key fails here; a missing one fails when a key must be encrypted or decrypted
            (listing and deleting work without it).
        client_factory: builds an Attentive client for a key; defaults to ``AttentiveClient(key)``, which
            reads ``ATTENTIVE_API_URL``. Tests pass a fake or an ``httpx.MockTransport``-backed client.
    """

    def __init__(
        self,
        redis: redis.Redis,
        secret_key: str | None,
        client_factory: Callable[[str], AttentiveClient] | None = None,
    ) -> None:
        self._redis = redis
        self._cipher = Cipher(secret_key) if secret_key and secret_key.strip() else None
        self._client_factory: Callable[[str], AttentiveClient] = client_factory or AttentiveClient
        self._key = keys.authorizations()

    def __repr__(self) -> str:
        return "AuthorizationStore(<redis>)"

    # --- writes ----------------------------------------------------------------------------------------
    def create(self, label: str, api_key: str, description: str = "") -> Authorization:
        """Validate ``api_key`` with Attentive (``GET /v2/me``), then store it encrypted.

        Raises:
            AuthorizationInvalid: bad label/description/key format, or the label is taken.
            AuthorizationRejected: Attentive refused the key or could not be reached; nothing stored.
            SecretKeyMissing / SecretKeyInvalid: ``EXPORT_SECRET_KEY`` is unusable; nothing stored.
        """
        label = _clean_label(label)
        description = _clean_description(description)
        api_key = (api_key or "").strip()
        if not api_key:
            raise AuthorizationInvalid("the API key is empty")
        cipher = self._require_cipher()
        _check_label_free(label, self._load_all())  # fail fast, before the network call
        company_name = self._validate_with_attentive(api_key)
        record = Authorization(
            id=f"au_{secrets.token_hex(6)}",
            label=label,
            description=description,
            company_name=company_name,
            created_at=datetime.now(UTC),
            key_hint=key_hint(api_key),
            key_hash=api_key_hash(api_key),
            encrypted_key=cipher.encrypt(api_key),
        )

        def insert(pipe: redis.client.Pipeline) -> None:
            _check_label_free(label, _parse_all(pipe.hgetall(self._key)))
            pipe.multi()
            pipe.hset(self._key, record.id, _dump(record))

        self._transaction(insert)
        logger.info(
            "authorization saved: id=%s label=%r company=%r key=%s",
            record.id,
            record.label,
            record.company_name,
            record.key_hint,
        )
        return record

    def delete(self, id_or_label: str) -> None:
        """Remove an authorization.

        Raises:
            AuthorizationNotFound: no such id or label.
        """
        record = self.get(id_or_label)
        if not self._redis.hdel(self._key, record.id):
            raise AuthorizationNotFound(f"no authorization {id_or_label!r}")
        logger.info("authorization deleted: id=%s label=%r", record.id, record.label)

    def rotate(self) -> int:
        """Re-encrypt every stored key with the first key of ``EXPORT_SECRET_KEY``; returns how many.

        Raises:
            SecretKeyMismatch: naming an authorization no configured key can decrypt (then nothing is
                changed: the rewrite is all or nothing).
        """
        cipher = self._require_cipher()

        def rewrite(pipe: redis.client.Pipeline) -> int:
            updated: dict[str, str] = {}
            for record in _parse_all(pipe.hgetall(self._key)):
                try:
                    token = cipher.rotate(record.encrypted_key)
                except SecretKeyMismatch:
                    raise self._mismatch(record) from None
                updated[record.id] = _dump(record.model_copy(update={"encrypted_key": token}))
            pipe.multi()
            for record_id, data in updated.items():
                pipe.hset(self._key, record_id, data)
            return len(updated)

        rotated = self._transaction(rewrite)
        logger.info("authorizations re-encrypted with the newest secret key: %d", rotated)
        return rotated

    # --- reads -----------------------------------------------------------------------------------------
    def get(self, id_or_label: str) -> Authorization:
        """The authorization with this id, or else with this label (case-insensitive).

        Raises:
            AuthorizationNotFound: neither matches.
        """
        wanted = (id_or_label or "").strip()
        raw = self._redis.hget(self._key, wanted) if wanted else None
        if raw is not None:
            return Authorization.model_validate_json(text(raw))
        folded = wanted.casefold()
        for record in self._load_all():
            if record.label.casefold() == folded:
                return record
        raise AuthorizationNotFound(f"no authorization with id or label {wanted!r}")

    def list(self) -> builtins.list[Authorization]:
        """Every authorization, oldest first. Shows masked key hints only."""
        return sorted(self._load_all(), key=lambda r: (r.created_at, r.id))

    def api_key(self, id_or_label: str) -> str:
        """The decrypted API key: the only way the plaintext leaves the store. Never log it.

        Raises:
            AuthorizationNotFound: no such id or label.
            SecretKeyMissing / SecretKeyMismatch: the secret key is unset, or is not the one the key
                was saved with (the message names the authorization).
        """
        record = self.get(id_or_label)
        cipher = self._require_cipher()
        try:
            return cipher.decrypt(record.encrypted_key)
        except SecretKeyMismatch:
            raise self._mismatch(record) from None

    # --- internals -------------------------------------------------------------------------------------
    def _transaction(self, body: Callable[[redis.client.Pipeline], _T]) -> _T:
        """Run ``body`` under WATCH on the hash and EXEC what it queued; retry if another writer won."""
        # transaction=True said out loud: a Redis Cluster client's pipelines default to no MULTI.
        with self._redis.pipeline(transaction=True) as pipe:
            for _ in range(_MAX_TRANSACTION_ATTEMPTS):
                try:
                    pipe.watch(self._key)  # type: ignore[no-untyped-call]
                    result = body(pipe)
                    pipe.execute()
                    return result
                except redis.WatchError:
                    continue
        raise AuthorizationError("authorizations are being changed concurrently; try again")

    def _require_cipher(self) -> Cipher:
        if self._cipher is None:
            return Cipher(None)  # raises SecretKeyMissing with the how-to message
        return self._cipher

    def _load_all(self) -> builtins.list[Authorization]:
        return _parse_all(self._redis.hgetall(self._key))

    @staticmethod
    def _mismatch(record: Authorization) -> SecretKeyMismatch:
        return SecretKeyMismatch(
            f"cannot decrypt the API key of authorization {record.label!r} (id {record.id}): "
            "EXPORT_SECRET_KEY is not the key it was saved with, or the record was altered. Restore "
            "the original key (list it after the new one to rotate), or delete and re-create the "
            "authorization"
        )

    def _validate_with_attentive(self, api_key: str) -> str | None:
        """Call ``/v2/me``; return the company name or raise :class:`AuthorizationRejected`."""
        try:
            client = self._client_factory(api_key)
        except ValueError:
            # AttentiveClient refuses keys that cannot be sent as a header, without echoing them.
            raise AuthorizationRejected(
                "the API key contains spaces or characters that cannot be sent to Attentive: "
                "paste the key exactly as Attentive showed it"
            ) from None
        try:
            with client:
                me = client.me()
        except Unauthorized:
            raise AuthorizationRejected(
                "Attentive rejected the API key (401 Unauthorized): check the key", status_code=401
            ) from None
        except Forbidden:
            raise AuthorizationRejected(
                "Attentive refused the API key (403 Forbidden) on /v2/me: check the app's status and "
                "permissions in Attentive",
                status_code=403,
            ) from None
        except RateLimited:
            raise AuthorizationRejected(
                "Attentive is rate limiting this key (429 Too Many Requests), so it could not be "
                "checked: try again in a few seconds",
                status_code=429,
            ) from None
        except ServerError as exc:
            raise AuthorizationRejected(
                f"Attentive failed while checking the key (HTTP {exc.status_code}): try again later",
                status_code=exc.status_code,
            ) from None
        except TransportError as exc:
            raise AuthorizationRejected(
                f"could not reach Attentive to check the key ({_scrub(exc.message, api_key)}): check "
                "ATTENTIVE_API_URL and the network, then try again"
            ) from None
        except AttentiveError as exc:
            raise AuthorizationRejected(
                f"Attentive did not accept the key (HTTP {exc.status_code}): {_scrub(exc.message, api_key)}",
                status_code=exc.status_code,
            ) from None
        return me.companyName


def _scrub(text: str, api_key: str) -> str:
    """Belt and braces: the client already scrubs its messages, but this one is shown to a person."""
    return text.replace(api_key, MASK) if api_key else text


def _clean_label(label: str) -> str:
    label = (label or "").strip()
    if not label:
        raise AuthorizationInvalid("the label is empty")
    if len(label) > MAX_LABEL_LENGTH:
        raise AuthorizationInvalid(f"the label is longer than {MAX_LABEL_LENGTH} characters")
    if not label.isprintable():
        raise AuthorizationInvalid("the label contains control characters")
    if _ID_PATTERN.match(label):
        raise AuthorizationInvalid(f"the label {label!r} looks like an authorization id; choose another")
    return label


def _clean_description(description: str) -> str:
    description = (description or "").strip()
    if len(description) > MAX_DESCRIPTION_LENGTH:
        raise AuthorizationInvalid(f"the description is longer than {MAX_DESCRIPTION_LENGTH} characters")
    return description


def _dump(record: Authorization) -> str:
    """The stored JSON: the public fields plus the ciphertext (which ``model_dump`` leaves out)."""
    data = record.model_dump(mode="json")
    data["encrypted_key"] = record.encrypted_key
    return json.dumps(data, ensure_ascii=False, separators=(",", ":"))


__all__ = [
    "Authorization",
    "AuthorizationError",
    "AuthorizationInvalid",
    "AuthorizationNotFound",
    "AuthorizationRejected",
    "AuthorizationStore",
    "SecretKeyError",
    "SecretKeyInvalid",
    "SecretKeyMismatch",
    "SecretKeyMissing",
    "key_hint",
]
