"""Thin Celery tasks: load ids, call a function in worker/, schedule the next step."""

from __future__ import annotations

from worker.runtime import REDIS_DOWN

__all__ = ["REDIS_DOWN"]
