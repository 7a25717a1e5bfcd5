"""The flow in the order data moves: inbox, ingest, buffer, flush, poll (parked polls), sweep, dead letters.

May import: ``worker.runtime``, ``worker.mapping``, ``worker.setup``, ``worker.clients``, ``worker.store``.
"""
