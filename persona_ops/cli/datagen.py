"""Data generation commands: ``generate-trait`` and ``generate-dataset`` (any OpenAI-compatible model)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from persona_ops.cli.common import fail
from persona_ops.errors import InputError, TransientError

_MODEL_HELP = "The model's name at the endpoint."
_URL_HELP = "An OpenAI-compatible /v1 URL (default: OpenAI's)."
_KEY_HELP = "The NAME of the environment variable holding the API key (not needed for a local server)."


def register(app: typer.Typer) -> None:
    app.command("generate-trait")(generate_trait)
    app.command("generate-dataset")(generate_dataset)


def _cfg(**fields):
    from persona_ops.datagen.replies import DatagenCfg

    return DatagenCfg(**{k: v for k, v in fields.items() if v is not None})


def _run(make):
    """Run ``make()``; input and service errors end the command with one line (exit 2), failures
    that a later attempt may cure with exit 1 (a rerun resumes)."""
    try:
        return make()
    except InputError as e:
        fail(e)
    except TransientError as e:
        typer.echo(f"persona-ops: temporary failure (a rerun resumes): {e}", err=True)
        raise typer.Exit(1)


def generate_trait(name: str = typer.Argument(..., help="The trait's name (its file stem)."),
                   description: str = typer.Option(..., help="What the trait is, in a sentence or two."),
                   out: Path = typer.Option(..., help="Writes OUT/extract/NAME.json and OUT/eval/NAME.json."),
                   base_url: Optional[str] = typer.Option(None, help=_URL_HELP),
                   model: Optional[str] = typer.Option(None, help=_MODEL_HELP),
                   api_key_env: str = typer.Option("OPENAI_API_KEY", help=_KEY_HELP),
                   questions: int = typer.Option(40, help="Questions in all, split in half between extract and eval."),
                   instructions: int = typer.Option(5, help="pos/neg instruction pairs."),
                   seed: int = typer.Option(0, min=0), temperature: float = typer.Option(1.0),
                   max_tokens: int = typer.Option(8000, min=1), max_retries: int = typer.Option(5, min=0),
                   backoff_base: float = typer.Option(1.0, min=0, help="Seconds before the first retry."),
                   timeout: float = typer.Option(300.0, min=0.001)) -> None:
    """Ask a model for a persona_vectors trait file (instruction pairs, questions, judge prompt)."""
    from persona_ops.datagen.trait import generate_trait as generate

    cfg = _run(lambda: _cfg(base_url=base_url, model=model, api_key_env=api_key_env, seed=seed,
                            temperature=temperature, max_tokens=max_tokens, max_retries=max_retries,
                            backoff_base=backoff_base, timeout=timeout))
    files = _run(lambda: generate(name, description, out, cfg, questions, instructions))
    for path in files.values():
        typer.echo(str(path))


def generate_dataset(trait_file: Path = typer.Argument(..., help="A trait file (e.g. OUT/extract/NAME.json)."),
                     out: Path = typer.Option(..., help="Writes OUT/<trait>/<strength>.jsonl."),
                     domains: Optional[str] = typer.Option(None, help="Comma-separated domains (default: a "
                                                                      "built-in list of 8)."),
                     per_domain: int = typer.Option(10, help="User questions per domain."),
                     strengths: str = typer.Option("normal,misaligned_1,misaligned_2"),
                     description: Optional[str] = typer.Option(None, help="The trait for the answer prompts "
                                                                          "(default: its first pos instruction)."),
                     base_url: Optional[str] = typer.Option(None, help=_URL_HELP),
                     model: Optional[str] = typer.Option(None, help=_MODEL_HELP),
                     api_key_env: str = typer.Option("OPENAI_API_KEY", help=_KEY_HELP),
                     seed: int = typer.Option(0, min=0), temperature: float = typer.Option(1.0),
                     max_tokens: int = typer.Option(2000, min=1), max_retries: int = typer.Option(5, min=0),
                     max_concurrency: int = typer.Option(16, min=1),
                     chunk_size: int = typer.Option(16, min=1, help="Requests per resumable chunk."),
                     backoff_base: float = typer.Option(1.0, min=0, help="Seconds before the first retry."),
                     timeout: float = typer.Option(300.0, min=0.001)) -> None:
    """Make a fine-tuning dataset per strength from a trait: questions per domain, then answers;
    resumable (a rerun asks only for what is missing)."""
    from persona_ops.datagen.dataset import DEFAULT_DOMAINS
    from persona_ops.datagen.dataset import generate_dataset as generate

    cfg = _run(lambda: _cfg(base_url=base_url, model=model, api_key_env=api_key_env, seed=seed,
                            temperature=temperature, max_tokens=max_tokens, max_retries=max_retries,
                            max_concurrency=max_concurrency, chunk_size=chunk_size, backoff_base=backoff_base,
                            timeout=timeout))
    names = [d.strip() for d in domains.split(",")] if domains else list(DEFAULT_DOMAINS)
    files = _run(lambda: generate(trait_file, out, cfg, names, per_domain, [s.strip() for s in strengths.split(",")],
                                  description))
    for path in files.values():
        typer.echo(str(path))
