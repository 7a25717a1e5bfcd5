"""Redis plumbing with no business rules: key names, Lua scripts, the shared rate limiter, replies.

May import: the standard library, redis-py and ``worker.settings`` only. Everything else builds on it.
"""
