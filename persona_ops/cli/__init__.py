"""The ``persona-ops`` command line (typer): pipelines (``run``, ``stage``, ``results``,
``dvc-yaml``, ``lineage``, ``serve-flows``), the fine-tuning ``experiment`` and tools (``data``,
``vectors``, ``serve-model``)."""

from __future__ import annotations

import typer

from persona_ops.cli import datagen, experiment, pipelines, promote, tools, track

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="persona-ops: persona vectors, persona space and fine-tuning experiments on LLMs.")
pipelines.register(app)
tools.register(app)
track.register(app)
datagen.register(app)
promote.register(app)
experiment.register(app)
