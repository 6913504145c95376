"""Pipelines: stages declared once (``stage.py``), one package per pipeline, and the spine that
derives the rest from the declarations: the registry (items, plans, ``dvc.yaml``), params, the
runner, DVC in process, the workspace lock and the evaluation primitive."""
