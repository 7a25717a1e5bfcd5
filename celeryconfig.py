"""Celery settings live in the installed package (worker/celeryconfig.py); this pointer keeps
``celery --config celeryconfig`` working from a checkout."""

from worker.celeryconfig import *  # noqa: F403
