"""Shared by router, worker and trainer: config, stubs, errors, validation, registry,
tracing, metrics, model store."""

__version__ = "0.1.0"
