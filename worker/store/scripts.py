"""The Lua scripts in ``lua/``: each file read once per process, registered once per Redis client.

Callers ask for a script by name and call it with keys and arguments. redis-py runs it with EVALSHA
and loads it again after a NOSCRIPT (a Redis restart or failover empties Redis' script cache), so
no caller deals with script loading.

Example::

    scripts.script(client, "buffer")(keys=[...], args=[...])
"""

from __future__ import annotations

import weakref
from functools import cache
from importlib import resources
from typing import Literal

import redis
from redis.commands.core import Script

#: Every script, by its file name in ``lua/`` without ``.lua``.
ScriptName = Literal["buffer", "ratelimit_acquire", "ratelimit_penalize"]

#: Registered scripts per client; a client's entry goes with the client.
_registered: weakref.WeakKeyDictionary[redis.Redis, dict[ScriptName, Script]] = weakref.WeakKeyDictionary()


@cache
def source(name: ScriptName) -> str:
    """The text of ``lua/<name>.lua``, read from the installed package once."""
    return (resources.files("worker.store") / "lua" / f"{name}.lua").read_text(encoding="utf-8")


def script(client: redis.Redis, name: ScriptName) -> Script:
    """The script ``name`` registered on ``client`` (the same object on every call for that client)."""
    scripts = _registered.setdefault(client, {})
    registered = scripts.get(name)
    if registered is None:
        registered = scripts[name] = client.register_script(source(name))
    return registered
