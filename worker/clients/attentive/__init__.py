"""Attentive client: the only code that talks HTTP to Attentive (CONTRACT.md).

Import from here, not from the submodules::

    from worker.clients.attentive import AttentiveClient, RateLimited
"""

from worker.clients.attentive.client import MAX_USERS_PER_REQUEST, AttentiveClient
from worker.clients.attentive.errors import (
    AttentiveError,
    Forbidden,
    InvalidRequest,
    NotFound,
    RateLimited,
    ServerError,
    TransportError,
    Unauthorized,
    UnexpectedResponse,
)
from worker.clients.attentive.models import BulkJobStatus, BulkSuccess, MeResponse, ResultLine

__all__ = [
    "MAX_USERS_PER_REQUEST",
    "AttentiveClient",
    "AttentiveError",
    "BulkJobStatus",
    "BulkSuccess",
    "Forbidden",
    "InvalidRequest",
    "MeResponse",
    "NotFound",
    "RateLimited",
    "ResultLine",
    "ServerError",
    "TransportError",
    "Unauthorized",
    "UnexpectedResponse",
]
