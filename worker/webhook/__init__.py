"""The Lytics audience-trigger receiver: request checks, the Starlette app and its server.

A face: stores raw bodies as inbox chunks and queues their ids; may import ``worker.pipeline`` and below.
"""

from typing import Any


def __getattr__(name: str) -> Any:
    """``uvicorn worker.webhook:app`` works like ``uvicorn worker.webhook.receiver:app``: the app is
    built from the environment on first access, and a bad setting (no ``WEBHOOK_TOKEN``) ends the
    server with one ``error:`` line, not a traceback (see ``receiver.WebhookStartupError``)."""
    if name == "app":
        from worker.webhook import receiver

        return receiver.app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
