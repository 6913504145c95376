"""The ``persona-ops`` command line (typer): pipelines (``run``, ``stage``, ``results``,
``dvc-yaml``, ``lineage``, ``serve-flows``), the servers (``ui``), the fine-tuning ``experiment``
and tools (``data``, ``vectors``, ``serve-model``, ``chat``)."""

from __future__ import annotations

import typer

from persona_ops.cli import chat, datagen, experiment, pipelines, promote, tools, track, ui

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="persona-ops: persona vectors, persona space and fine-tuning experiments on LLMs.")
pipelines.register(app)
tools.register(app)
track.register(app)
datagen.register(app)
promote.register(app)
experiment.register(app)
chat.register(app)
ui.register(app)
