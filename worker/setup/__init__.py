"""What operators configure: job configuration files, export jobs, authorizations, key encryption.

May import: ``worker.store`` and ``worker.clients`` (an API key is validated with Attentive when saved).
"""
