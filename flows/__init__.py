"""Prefect flows composing the tasks in ``tasks/``, and their deployments."""
