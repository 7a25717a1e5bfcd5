"""Unit tests for stored authorizations: validation with /me on save, encryption at rest, no leaks."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from collections.abc import Callable

import fakeredis
import httpx
import pytest
from cryptography.fernet import Fernet

from worker.clients.attentive import AttentiveClient
from worker.setup.authorizations import (
    Authorization,
    AuthorizationInvalid,
    AuthorizationNotFound,
    AuthorizationRejected,
    AuthorizationStore,
    key_hint,
)
from worker.setup.crypto import (
    Cipher,
    SecretKeyInvalid,
    SecretKeyMismatch,
    SecretKeyMissing,
    generate_secret_key,
)
from worker.store import keys
from worker.store.ratelimit import api_key_hash

GOOD_KEY = "attn_live_9Qw2Zr7Tk1Lm4Np8Xy3f9a"
OTHER_GOOD_KEY = "attn_live_other_key_000000beef"
SECRET = generate_secret_key()


class FakeAttentive:
    """An httpx.MockTransport handler for ``GET /v2/me`` that answers by bearer token."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        #: token -> status code (anything not listed is a 401)
        self.status: dict[str, int] = {GOOD_KEY: 200, OTHER_GOOD_KEY: 200}
        self.fail_transport = False

    def __call__(self, request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/v2/me"
        token = request.headers["Authorization"].removeprefix("Bearer ")
        self.calls.append(token)
        if self.fail_transport:
            raise httpx.ConnectError("connection refused", request=request)
        code = self.status.get(token, 401)
        if code == 200:
            return httpx.Response(
                200,
                json={
                    "applicationName": "Audience Export",
                    "attentiveDomainName": "hudsonivy.attn.tv",
                    "companyName": "Hudson & Ivy",
                    "contactEmail": "ops@example.com",
                    "companyId": "MDc6Q29tcGFueTI",
                },
            )
        return httpx.Response(code, json={"error": {"id": "e1", "message": "nope"}})

    def factory(self) -> Callable[[str], AttentiveClient]:
        def make(api_key: str) -> AttentiveClient:
            return AttentiveClient(
                api_key,
                base_url="https://attentive.test",
                transport=httpx.MockTransport(self),
                max_attempts=1,
            )

        return make


@pytest.fixture
def attentive() -> FakeAttentive:
    return FakeAttentive()


@pytest.fixture
def store(fake_redis: fakeredis.FakeRedis, attentive: FakeAttentive) -> AuthorizationStore:
    return AuthorizationStore(fake_redis, SECRET, client_factory=attentive.factory())


def raw_values(r: fakeredis.FakeRedis) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else v for v in r.hgetall(keys.authorizations()).values()]


# --- saving -------------------------------------------------------------------------------------------
def test_valid_key_is_checked_with_me_and_stored_encrypted(
    store: AuthorizationStore, fake_redis: fakeredis.FakeRedis, attentive: FakeAttentive
) -> None:
    auth = store.create("Production", GOOD_KEY, description="main brand")
    assert attentive.calls == [GOOD_KEY]
    assert auth.label == "Production"
    assert auth.description == "main brand"
    assert auth.company_name == "Hudson & Ivy"
    assert auth.key_hint == "••••3f9a"
    assert auth.key_hash == api_key_hash(GOOD_KEY)
    assert auth.id.startswith("au_")

    [raw] = raw_values(fake_redis)
    assert GOOD_KEY not in raw
    assert GOOD_KEY[-8:] not in raw
    stored = json.loads(raw)
    assert Fernet(SECRET.encode()).decrypt(stored["encrypted_key"].encode()).decode() == GOOD_KEY
    assert store.api_key("Production") == GOOD_KEY
    assert store.api_key(auth.id) == GOOD_KEY


def test_key_is_stored_without_surrounding_whitespace(store: AuthorizationStore) -> None:
    store.create("prod", f"  {GOOD_KEY}\n")
    assert store.api_key("prod") == GOOD_KEY


def test_unknown_key_is_refused_with_a_clear_401_message_and_nothing_stored(
    store: AuthorizationStore, fake_redis: fakeredis.FakeRedis
) -> None:
    with pytest.raises(AuthorizationRejected) as info:
        store.create("prod", "attn_live_wrong_key_123456")
    assert str(info.value) == "Attentive rejected the API key (401 Unauthorized): check the key"
    assert info.value.status_code == 401
    assert fake_redis.hlen(keys.authorizations()) == 0


@pytest.mark.parametrize(
    ("status", "phrase"),
    [(403, "403 Forbidden"), (429, "429 Too Many Requests"), (500, "HTTP 500"), (503, "HTTP 503")],
)
def test_other_refusals_are_clear_and_store_nothing(
    store: AuthorizationStore,
    fake_redis: fakeredis.FakeRedis,
    attentive: FakeAttentive,
    status: int,
    phrase: str,
) -> None:
    attentive.status[GOOD_KEY] = status
    with pytest.raises(AuthorizationRejected) as info:
        store.create("prod", GOOD_KEY)
    assert phrase in str(info.value)
    assert info.value.status_code == status
    assert GOOD_KEY not in str(info.value) and GOOD_KEY not in repr(info.value)
    assert fake_redis.hlen(keys.authorizations()) == 0


def test_unreachable_attentive_is_refused_clearly(
    store: AuthorizationStore, fake_redis: fakeredis.FakeRedis, attentive: FakeAttentive
) -> None:
    attentive.fail_transport = True
    with pytest.raises(AuthorizationRejected) as info:
        store.create("prod", GOOD_KEY)
    assert str(info.value).startswith("could not reach Attentive to check the key")
    assert "ATTENTIVE_API_URL" in str(info.value)
    assert info.value.status_code is None
    assert GOOD_KEY not in str(info.value)
    assert fake_redis.hlen(keys.authorizations()) == 0


def test_key_that_cannot_be_sent_as_a_header_is_refused_without_echoing_it(
    store: AuthorizationStore, attentive: FakeAttentive
) -> None:
    bad = "attn live key with spaces"
    with pytest.raises(AuthorizationRejected) as info:
        store.create("prod", bad)
    assert "cannot be sent" in str(info.value)
    assert bad not in str(info.value)
    assert attentive.calls == []


def test_empty_key_is_refused_before_any_request(store: AuthorizationStore, attentive: FakeAttentive) -> None:
    with pytest.raises(AuthorizationInvalid, match="API key is empty"):
        store.create("prod", "   ")
    assert attentive.calls == []


# --- labels -------------------------------------------------------------------------------------------
def test_labels_are_unique_case_insensitively_checked_before_calling_attentive(
    store: AuthorizationStore, attentive: FakeAttentive, fake_redis: fakeredis.FakeRedis
) -> None:
    first = store.create("Production", GOOD_KEY)
    with pytest.raises(AuthorizationInvalid, match="already exists") as info:
        store.create(" production ", OTHER_GOOD_KEY)
    assert first.id in str(info.value)
    assert attentive.calls == [GOOD_KEY]
    assert fake_redis.hlen(keys.authorizations()) == 1


def test_label_taken_while_attentive_was_being_asked_is_still_refused(
    fake_redis: fakeredis.FakeRedis, attentive: FakeAttentive
) -> None:
    """A concurrent operator saves the same label between the pre-check and the write."""
    other = AuthorizationStore(fake_redis, SECRET, client_factory=attentive.factory())
    inner = attentive.factory()

    def racing_factory(api_key: str) -> AttentiveClient:
        if api_key == GOOD_KEY:
            other.create("prod", OTHER_GOOD_KEY)
        return inner(api_key)

    store = AuthorizationStore(fake_redis, SECRET, client_factory=racing_factory)
    with pytest.raises(AuthorizationInvalid, match="already exists"):
        store.create("prod", GOOD_KEY)
    assert [a.key_hash for a in store.list()] == [api_key_hash(OTHER_GOOD_KEY)]


@pytest.mark.parametrize(
    ("label", "message"),
    [
        ("", "label is empty"),
        ("   ", "label is empty"),
        ("x" * 101, "longer than 100"),
        ("bad\nlabel", "control characters"),
        ("au_0123456789ab", "looks like an authorization id"),
    ],
)
def test_bad_labels_are_refused(store: AuthorizationStore, label: str, message: str) -> None:
    with pytest.raises(AuthorizationInvalid, match=message):
        store.create(label, GOOD_KEY)


def test_overlong_description_is_refused(store: AuthorizationStore) -> None:
    with pytest.raises(AuthorizationInvalid, match="description"):
        store.create("prod", GOOD_KEY, description="d" * 1001)


# --- reading ------------------------------------------------------------------------------------------
def test_get_list_and_delete_by_id_or_label(store: AuthorizationStore) -> None:
    a = store.create("Production", GOOD_KEY)
    b = store.create("Staging", OTHER_GOOD_KEY)
    assert store.get(a.id) == a
    assert store.get("staging") == b
    assert [x.label for x in store.list()] == ["Production", "Staging"]
    store.delete("PRODUCTION")
    assert [x.id for x in store.list()] == [b.id]
    store.delete(b.id)
    assert store.list() == []


def test_unknown_authorization_is_not_found(store: AuthorizationStore) -> None:
    for call in (store.get, store.delete, store.api_key):
        with pytest.raises(AuthorizationNotFound, match="nothing-here"):
            call("nothing-here")


def test_listing_shows_only_the_masked_hint(store: AuthorizationStore) -> None:
    store.create("prod", GOOD_KEY)
    [auth] = store.list()
    assert auth.key_hint == "••••3f9a"
    dumped = auth.model_dump(mode="json")
    assert "encrypted_key" not in dumped
    assert set(dumped) == {"id", "label", "description", "company_name", "created_at", "key_hint", "key_hash"}


def test_key_hint_never_shows_more_than_four_chars_or_a_quarter_of_the_key() -> None:
    assert key_hint("abcdefghijklmnop") == "••••mnop"
    assert key_hint("abcdefgh") == "••••gh"
    assert key_hint("abc") == "••••"
    assert key_hint("") == "••••"


def test_the_key_never_appears_in_repr_str_dumps_or_logs(
    store: AuthorizationStore, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    auth = store.create("prod", GOOD_KEY)
    with pytest.raises(AuthorizationRejected):
        store.create("other", "attn_live_wrong_key_123456")
    texts = [
        repr(auth),
        str(auth),
        json.dumps(auth.model_dump(mode="json")),
        auth.model_dump_json(),
        repr(store),
        repr(store.list()),
        caplog.text,
    ]
    for text in texts:
        assert GOOD_KEY not in text
        assert GOOD_KEY[:-4] not in text
        assert "attn_live_wrong_key_123456" not in text
        assert auth.encrypted_key not in text  # not even the ciphertext
    assert "authorization saved" in caplog.text


# --- the secret key -----------------------------------------------------------------------------------
def test_missing_secret_key_is_a_clear_error_and_nothing_is_sent_or_stored(
    fake_redis: fakeredis.FakeRedis, attentive: FakeAttentive
) -> None:
    store = AuthorizationStore(fake_redis, None, client_factory=attentive.factory())
    with pytest.raises(SecretKeyMissing) as info:
        store.create("prod", GOOD_KEY)
    assert str(info.value) == "EXPORT_SECRET_KEY is not set; generate one with: attentive-export secret-key"
    assert attentive.calls == []
    assert fake_redis.hlen(keys.authorizations()) == 0
    assert store.list() == []  # metadata needs no secret


def test_missing_secret_key_blocks_decryption_but_not_listing(
    store: AuthorizationStore, fake_redis: fakeredis.FakeRedis
) -> None:
    store.create("prod", GOOD_KEY)
    keyless = AuthorizationStore(fake_redis, "  ")
    assert [a.label for a in keyless.list()] == ["prod"]
    with pytest.raises(SecretKeyMissing):
        keyless.api_key("prod")


@pytest.mark.parametrize("bad", ["not-a-key", "x" * 44, SECRET[:-2], "clé-non-ascii", f"{SECRET},oops"])
def test_malformed_secret_key_is_a_clear_error_without_echoing_it(
    fake_redis: fakeredis.FakeRedis, bad: str
) -> None:
    with pytest.raises(SecretKeyInvalid) as info:
        AuthorizationStore(fake_redis, bad)
    message = str(info.value)
    assert message.startswith("EXPORT_SECRET_KEY is not a valid Fernet key")
    assert "attentive-export secret-key" in message
    assert bad not in message and "oops" not in message


def test_wrong_secret_key_is_a_clear_error_naming_the_authorization(
    store: AuthorizationStore, fake_redis: fakeredis.FakeRedis
) -> None:
    auth = store.create("Production", GOOD_KEY)
    other = AuthorizationStore(fake_redis, generate_secret_key())
    with pytest.raises(SecretKeyMismatch) as info:
        other.api_key("Production")
    message = str(info.value)
    assert "'Production'" in message and auth.id in message
    assert "EXPORT_SECRET_KEY is not the key it was saved with" in message
    assert GOOD_KEY not in message and auth.encrypted_key not in message
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_tampered_ciphertext_is_refused_not_returned(
    store: AuthorizationStore, fake_redis: fakeredis.FakeRedis
) -> None:
    auth = store.create("prod", GOOD_KEY)
    record = json.loads(fake_redis.hget(keys.authorizations(), auth.id) or b"{}")
    record["encrypted_key"] = record["encrypted_key"][:-6] + "AAAAAA"
    fake_redis.hset(keys.authorizations(), auth.id, json.dumps(record))
    with pytest.raises(SecretKeyMismatch, match="'prod'"):
        store.api_key("prod")


def test_secret_key_rotation_reencrypts_every_record(
    store: AuthorizationStore, fake_redis: fakeredis.FakeRedis
) -> None:
    store.create("a", GOOD_KEY)
    store.create("b", OTHER_GOOD_KEY)
    new = generate_secret_key()
    both = AuthorizationStore(fake_redis, f"{new}, {SECRET}")
    assert both.api_key("a") == GOOD_KEY  # the old key still decrypts while listed
    assert both.rotate() == 2
    only_new = AuthorizationStore(fake_redis, new)
    assert only_new.api_key("a") == GOOD_KEY
    assert only_new.api_key("b") == OTHER_GOOD_KEY
    with pytest.raises(SecretKeyMismatch):
        store.api_key("a")


def test_rotation_with_an_undecryptable_record_changes_nothing(
    store: AuthorizationStore, fake_redis: fakeredis.FakeRedis
) -> None:
    store.create("a", GOOD_KEY)
    before = raw_values(fake_redis)
    with pytest.raises(SecretKeyMismatch, match="'a'"):
        AuthorizationStore(fake_redis, generate_secret_key()).rotate()
    assert raw_values(fake_redis) == before


def test_generated_secret_keys_are_fresh_fernet_keys() -> None:
    a, b = generate_secret_key(), generate_secret_key()
    assert a != b and len(a) == 44
    assert Cipher(a).decrypt(Cipher(a).encrypt("x")) == "x"
    assert repr(Cipher(a)) == "Cipher(<secret>)"


def test_python_dash_m_worker_crypto_prints_a_key() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "worker.setup.crypto"], capture_output=True, text=True, check=True, timeout=30
    ).stdout.strip()
    Fernet(out.encode())


def test_stored_record_round_trips(store: AuthorizationStore, fake_redis: fakeredis.FakeRedis) -> None:
    auth = store.create("prod", GOOD_KEY)
    again = Authorization.model_validate_json(fake_redis.hget(keys.authorizations(), auth.id) or b"")
    assert again == auth
    assert again.encrypted_key == auth.encrypted_key
