"""Audience export to Attentive: process wiring at this level, one package per concern below.

See the README's code map; imports flow one way, checked by import-linter (``make lint``).
"""
