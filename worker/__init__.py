"""Audience export to Attentive: process wiring at this level, one package per concern below.

See the README's code map; imports flow one way, checked by import-linter (``make lint``).
``backoff`` (retry delays) and ``jsonio`` (lenient JSON reading) are leaves below every layer: they
import only the standard library (and orjson), and any layer may import them.
"""
