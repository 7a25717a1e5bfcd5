"""Workers survive a Redis restart while they hold unacknowledged messages (celery/kombu 5.7.0).

A worker always holds some messages unacknowledged: a poll task waits out its countdown inside the
worker, and ``task_acks_late`` keeps every message unacknowledged until its task ran. When the
broker connection breaks, celery cleans up in ``Consumer.on_connection_error_after_connected``:
``Connection.collect()`` closes the channels and detaches the transport (``transport.client =
None``), then ``Connection.close()`` closes the default channel a second time (new in celery 5.7.0).
The first close stopped half-way: reading the reply of the BRPOP in flight on the dead socket
raised ``ConnectionError``. So the second one gets as far as kombu's ``QoS.restore_unacked()``, which
builds a Redis connection pool from the detached ``transport.client`` and raises
``AttributeError: 'NoneType' object has no attribute 'hostname'``. That is no connection error:
the worker logs "Unrecoverable error" and exits with status 1. A task still running at that moment
meets the same wall when it ends: its acknowledgement goes through the old channel
(``'NoneType' object has no attribute 'client'``), again fatal.

Even without the crash the restore could not work, since Redis is down at that moment. The messages
are safe in Redis' ``unacked`` hash (the append-only file keeps it), but kombu puts them back on
their queues only after the visibility timeout (an hour, worker/celeryconfig.py), and celery drops
its own copy of every scheduled request on connection loss. A countdown task would wait an hour.

:class:`RecoveringQoS` replaces kombu's Redis QoS, and differs only on a channel whose transport is
gone (``channel.connection`` or its ``client`` is None), where kombu raised AttributeError:

- ``restore_unacked`` remembers the delivery tags it cannot restore there, or cannot restore because
  Redis does not answer, instead of raising; a restore that reaches Redis is kombu's own;
- ``ack`` and ``reject`` of a message from such a channel do nothing (logged): the channel's close
  already handed the message back (restored, or remembered), so touching its entry in Redis could
  only hit a new delivery of it. The task runs again, as celery documents for a connection loss
  (``worker_cancel_long_running_tasks_on_connection_loss``) and as after a worker crash.

:class:`RestoreUnackedAfterReconnect`, a consumer bootstep, restores the remembered tags as soon as
the consumer has connected again, with kombu's ``restore_by_tag`` (one WATCHed transaction per
message: one acknowledged or restored meanwhile is left alone). A message that another worker holds
again by then (put back after the visibility timeout and delivered again: its delivery time in
``unacked_index`` is later than our loss of the connection) is left to that worker.

If this process dies before it reconnects, the messages come back after the visibility timeout, and
the sweep re-drives lost polls well before that (worker/pipeline/sweep.py).
tests/integration/test_redis_restart.py checks the whole path with a real worker and a real Redis;
when celery or kombu fix it upstream, this module can go.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from celery import Celery, bootsteps
from kombu.transport import redis as kombu_redis

log = logging.getLogger(__name__)

#: Delivery tag -> ``time.time()`` when its restore failed. Filled and emptied by the worker's main
#: process (the consumer); pool processes never consume, so their copy stays empty.
_unrestored: dict[str, float] = {}


class RecoveringQoS(kombu_redis.QoS):
    """kombu's Redis QoS, except on a channel whose transport is gone (see the module docstring)."""

    def _transport_gone(self) -> bool:
        transport = self.channel.connection  # None once the channel is closed
        return transport is None or transport.client is None  # client None once detached

    def restore_unacked(self, client: Any = None) -> None:
        tags = list(self._delivered)
        restored = 0
        if tags and (client is not None or not self._transport_gone()):
            try:
                with self.channel.conn_or_acquire(client) as conn:
                    for tag in tags:
                        self.restore_by_tag(tag, client=conn)  # type: ignore[no-untyped-call]
                        restored += 1
            except self.channel.connection_errors:
                log.debug("restoring unacknowledged messages failed", exc_info=True)
            # Any other error propagates, as from kombu's own restore_unacked.
        pending = tags[restored:]
        if pending:
            _unrestored.update(dict.fromkeys(pending, time.time()))
            log.warning(
                "Broker unreachable: %d unacknowledged message(s) will be restored once the worker "
                "has reconnected",
                len(pending),
            )
        self._delivered.clear()

    def ack(self, delivery_tag: str) -> None:
        if self._transport_gone():
            _ignored("acknowledgement", delivery_tag)
            return
        super().ack(delivery_tag)  # type: ignore[no-untyped-call]

    def reject(self, delivery_tag: str, requeue: bool = False) -> None:
        if self._transport_gone():
            _ignored("rejection", delivery_tag)
            return
        super().reject(delivery_tag, requeue=requeue)  # type: ignore[no-untyped-call]


def _ignored(what: str, delivery_tag: str) -> None:
    log.warning(
        "Ignored the %s of message %s: it came over a broker connection that was lost, and was put "
        "back on its queue (now or at the next reconnection)",
        what,
        delivery_tag,
    )


class RestoreUnackedAfterReconnect(bootsteps.StartStopStep):  # type: ignore[misc]
    """Consumer bootstep: restores the messages whose restore failed while the broker was down."""

    requires = ("celery.worker.consumer.connection:Connection",)

    def start(self, c: Any) -> None:
        if not _unrestored or c.connection is None:
            return
        channel = c.connection.default_channel
        qos = channel.qos
        if not isinstance(qos, RecoveringQoS):  # another broker: nothing was remembered for it
            return
        restored, remembered = 0, len(_unrestored)
        with channel.conn_or_acquire() as client:
            # A connection error here propagates: celery reconnects and this runs again, with the
            # tags not yet handled still remembered.
            for tag, lost_at in list(_unrestored.items()):
                delivered_at = client.zscore(qos.unacked_index_key, tag)
                if delivered_at is not None and float(delivered_at) <= lost_at:
                    qos.restore_by_tag(tag, client=client)  # type: ignore[no-untyped-call]
                    restored += 1
                del _unrestored[tag]
        log.warning(
            "Restored %d of %d unacknowledged message(s) held when the broker connection was lost "
            "(the others were acknowledged, restored or lost meanwhile)",
            restored,
            remembered,
        )


def install(app: Celery) -> None:
    """Use :class:`RecoveringQoS` for every Redis channel of this process; add the bootstep to ``app``.

    For a Redis broker only: ``worker.app`` leaves it out with RabbitMQ, which puts a closed
    channel's unacknowledged messages back by itself."""
    kombu_redis.Channel.QoS = RecoveringQoS
    app.steps["consumer"].add(RestoreUnackedAfterReconnect)
