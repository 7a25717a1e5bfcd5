"""HTTP to the outside: Attentive (``clients.attentive``) and Lytics' segment scan (``clients.lytics``).

May import: ``worker.settings`` and ``worker.store`` only; no job or pipeline logic.
"""
