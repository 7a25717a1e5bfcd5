"""Encryption at rest for stored Attentive API keys (DESIGN.md invariant 5), with Fernet.

Why Fernet: authenticated symmetric encryption (AES-128-CBC + HMAC-SHA256) from ``cryptography``, with
a key format operators can paste into an environment variable. Nothing here is home-made crypto.

The key comes from ``EXPORT_SECRET_KEY``. Make one with either of::

    attentive-export secret-key          # works with no other setting, and with a bad key still set
    python -m worker.setup.crypto
    python -c "from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())"

Rotation: ``EXPORT_SECRET_KEY`` may hold several keys separated by commas, newest first. The first
encrypts; every one of them decrypts (``MultiFernet``). Put the new key in front, re-encrypt the stored
records (:meth:`worker.setup.authorizations.AuthorizationStore.rotate`), then drop the old key.

Every failure is an :class:`SecretKeyError` with a message an operator can act on. Messages never
contain the secret key, a ciphertext or a plaintext, and there is no plaintext fallback.
"""

from __future__ import annotations

import sys

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

#: Environment variable holding the Fernet key(s).
SECRET_KEY_ENV = "EXPORT_SECRET_KEY"
#: What to tell an operator who needs a key.
GENERATE_HINT = "generate one with: attentive-export secret-key"


class SecretKeyError(Exception):
    """A problem with ``EXPORT_SECRET_KEY``; ``str(exc)`` is safe to show to an operator."""


class SecretKeyMissing(SecretKeyError):
    """``EXPORT_SECRET_KEY`` is not set, so stored API keys can be neither written nor read."""


class SecretKeyInvalid(SecretKeyError):
    """``EXPORT_SECRET_KEY`` is not a Fernet key (32 url-safe base64-encoded bytes)."""


class SecretKeyMismatch(SecretKeyError):
    """A stored value cannot be decrypted: the secret key is not the one it was encrypted with."""


def generate_secret_key() -> str:
    """A fresh random Fernet key, suitable for ``EXPORT_SECRET_KEY``."""
    return Fernet.generate_key().decode("ascii")


class Cipher:
    """Encrypts and decrypts short strings with the configured Fernet key(s).

    Example::

        cipher = Cipher(os.environ.get("EXPORT_SECRET_KEY"))
        token = cipher.encrypt("secret")
        assert cipher.decrypt(token) == "secret"
    """

    def __init__(self, secret_key: str | None) -> None:
        """Parse the key(s).

        Raises:
            SecretKeyMissing: ``secret_key`` is None or blank.
            SecretKeyInvalid: one of the comma-separated keys is not a Fernet key (the key is not echoed).
        """
        parts = [p.strip() for p in (secret_key or "").split(",") if p.strip()]
        if not parts:
            raise SecretKeyMissing(f"{SECRET_KEY_ENV} is not set; {GENERATE_HINT}")
        fernets: list[Fernet] = []
        for position, part in enumerate(parts, start=1):
            try:
                fernets.append(Fernet(part.encode("ascii")))
            except (ValueError, UnicodeEncodeError):
                where = f" (key {position} of {len(parts)})" if len(parts) > 1 else ""
                raise SecretKeyInvalid(
                    f"{SECRET_KEY_ENV} is not a valid Fernet key{where}: expected 32 url-safe "
                    f"base64-encoded bytes (44 characters); {GENERATE_HINT}"
                ) from None
        self._fernet = MultiFernet(fernets)

    def __repr__(self) -> str:
        return "Cipher(<secret>)"

    def encrypt(self, plaintext: str) -> str:
        """Encrypt with the first (newest) key; returns a url-safe ASCII token."""
        return self._fernet.encrypt(plaintext.encode("utf-8")).decode("ascii")

    def decrypt(self, token: str) -> str:
        """Decrypt with any configured key.

        Raises:
            SecretKeyMismatch: no configured key decrypts it (wrong key, or the token was altered).
        """
        try:
            return self._fernet.decrypt(token.encode("ascii")).decode("utf-8")
        except (InvalidToken, UnicodeError):
            raise SecretKeyMismatch(
                f"{SECRET_KEY_ENV} cannot decrypt a stored value: it is not the key the value was "
                "encrypted with, or the stored value was altered"
            ) from None

    def rotate(self, token: str) -> str:
        """Re-encrypt a token with the first (newest) key.

        Raises:
            SecretKeyMismatch: no configured key decrypts it.
        """
        try:
            return self._fernet.rotate(token.encode("ascii")).decode("ascii")
        except (InvalidToken, UnicodeError):
            raise SecretKeyMismatch(f"{SECRET_KEY_ENV} cannot decrypt a stored value") from None


def main() -> None:
    """``python -m worker.setup.crypto``: print a new key for ``EXPORT_SECRET_KEY``."""
    sys.stdout.write(generate_secret_key() + "\n")


if __name__ == "__main__":
    main()
