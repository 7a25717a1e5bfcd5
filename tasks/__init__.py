"""Thin Celery tasks: load ids, call a function in worker/, schedule the next step."""

from __future__ import annotations

import redis

#: Redis briefly unavailable: the task retries with backoff; its message is acknowledged only after
#: it ran (acks_late), so nothing accepted is lost.
REDIS_DOWN = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)
