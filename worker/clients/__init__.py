"""HTTP to the outside: Attentive (``clients.attentive``) and Lytics' segment scan (``clients.lytics``).

May import: ``worker.settings``, ``worker.store`` and the leaves (``worker.jsonio``); no job or
pipeline logic. ``clients.http`` holds what both clients share (reading ``Retry-After``).
"""
