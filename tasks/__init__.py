"""Prefect tasks: thin wrappers over persona_ops stages (retries, timeouts, logging)."""
