"""Attentive's published OpenAPI v2 document (a byte-identical copy of shared/attentive/openapi-v2.json)
and helpers that validate what we send and what the sandbox answers against its schemas."""
