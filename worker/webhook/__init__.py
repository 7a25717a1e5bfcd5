"""The Lytics audience-trigger receiver: request checks, the Starlette app and its server.

A face: stores raw bodies as inbox chunks and queues their ids; may import ``worker.pipeline`` and below.
"""
