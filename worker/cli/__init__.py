"""The operators' command line, ``attentive-export``: authorizations, jobs, data in, status, demo.

A face: may import anything in ``worker``; nothing in ``worker`` imports it.
"""
