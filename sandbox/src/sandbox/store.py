"""The sandbox's per-user attribute store: what Attentive would hold after our jobs completed.

Records are applied when a job *completes*, in completion order, never at submission; that is what lets
tests catch a client that assumes Attentive processes jobs in the order they were submitted. Each user
keeps a history of (job id, completion order, custom values) so tests can check which write landed last.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

#: Lookup order when matching an incoming record to an existing user.
MATCH_ORDER = ("phone", "email", "clientUserId", "shopifyId", "klaviyoId")
TYPED_GROUPS = ("demographic", "location", "locale")


@dataclass
class StoredUser:
    """One user as Attentive would see it; ``history`` lists every applied write in order."""

    id: str
    identifiers: dict[str, Any] = field(default_factory=dict)
    attributes: dict[str, Any] = field(default_factory=dict)
    custom: dict[str, Any] = field(default_factory=dict)
    #: (job id or None for single-user writes, completion order, the write's custom attributes).
    history: list[tuple[str | None, int, dict[str, Any]]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "identifiers": self.identifiers,
            "attributes": self.attributes,
            "custom": self.custom,
            "history": [{"jobId": j, "completedOrder": o, "custom": c} for j, o, c in self.history],
        }


class UserStore:
    """Users keyed by a sandbox id, with an index from every identifier value to that id."""

    def __init__(self) -> None:
        self.users: dict[str, StoredUser] = {}
        self._index: dict[tuple[str, str], str] = {}
        self._next = 0

    def clear(self) -> None:
        self.__init__()  # type: ignore[misc]

    @staticmethod
    def _keys(ids: dict[str, Any]) -> list[tuple[str, str]]:
        keys = [(name, ids[name]) for name in MATCH_ORDER if name in ids]
        for item in ids.get("customIdentifiers") or ():
            keys.append((f"custom:{item['key']}", item["value"]))
        return keys

    def find(self, kind: str, value: str) -> StoredUser | None:
        """The user holding identifier ``kind`` (phone, email, clientUserId, ...) = ``value``."""
        uid = self._index.get((kind, value))
        return self.users.get(uid) if uid is not None else None

    def apply(self, user: dict[str, Any], job_id: str | None, order: int) -> StoredUser:
        """Upsert one validated record: identifiers merge, later attributes overwrite earlier ones."""
        ids: dict[str, Any] = user["identifiers"]
        keys = self._keys(ids)
        index = self._index
        uid = None
        for key in keys:
            uid = index.get(key)
            if uid is not None:
                break
        if uid is None:
            self._next += 1
            uid = f"u{self._next}"
            stored = StoredUser(uid)
            self.users[uid] = stored
        else:
            stored = self.users[uid]
        for key in keys:
            index[key] = uid
        merged = stored.identifiers
        for name, value in ids.items():
            if name == "customIdentifiers":
                have = {c["key"]: c for c in merged.get("customIdentifiers", [])}
                have.update({c["key"]: dict(c) for c in value})
                merged["customIdentifiers"] = list(have.values())
            else:
                merged[name] = value
        attrs = user.get("attributes")
        custom: dict[str, Any] = {}
        if attrs:
            for name, value in attrs.items():
                if name == "custom":
                    custom = value
                elif name in TYPED_GROUPS:
                    stored.attributes.setdefault(name, {}).update(value)
                else:
                    stored.attributes[name] = value
            stored.custom.update(custom)
        stored.history.append((job_id, order, custom))
        return stored

    def lookup(self, **criteria: str) -> list[StoredUser]:
        """Users matching every given identifier (phone=..., email=..., clientUserId=...)."""
        found: list[StoredUser] | None = None
        for kind, value in criteria.items():
            user = self.find(kind, value)
            candidates = [user] if user is not None else []
            found = candidates if found is None else [u for u in found if u in candidates]
        return list(self.users.values()) if found is None else found
