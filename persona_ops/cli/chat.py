"""``persona-ops chat``: an interactive terminal chat with a local model, optionally with a LoRA adapter
(a checkpoint directory or a registry URI), additive steering with a persona vector and the backdoor
sweep's trigger (see :mod:`persona_ops.inference.chat_session` for the loop and its slash commands).

Layer convention: layer L = hidden_states[L] (0 = embeddings, L >= 1 = output of decoder block L-1).
Registry URIs resolve in the project's store (``$MLFLOW_TRACKING_URI``, else ``<root>/mlflow.db``) to
the same local copies the pipelines use (``<root>/cache/registry``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from persona_ops.cli.common import fail
from persona_ops.errors import InputError

ROOT_HELP = "Project directory: its params.yaml (the trigger) and registry store (models:/ URIs)."


def register(app: typer.Typer) -> None:
    app.command("chat")(chat)


def chat(model: str = typer.Option("embedded", help="embedded | HF id[@revision] | local directory."),
         revision: str | None = typer.Option(None, help="Model revision (branch, tag or commit)."),
         adapter: str | None = typer.Option(None, help="A LoRA adapter: a checkpoint directory, "
                                            "models:/NAME@ALIAS or models:/NAME/N."),
         steer: str | None = typer.Option(None, help="VECTOR:LAYER:COEF: add COEF x row LAYER of a persona "
                                          "vector file (or models:/ URI) at hidden_states[LAYER] (1..layers)."),
         aggregate: str = typer.Option("response_avg", help="The vector file's aggregate to steer with "
                                       "(prompt_avg | response_avg | prompt_last)."),
         system: str | None = typer.Option(None, help="The system prompt (/system changes it)."),
         max_new_tokens: int = typer.Option(256, min=1, help="The most tokens of one answer."),
         temperature: float = typer.Option(0.7, min=0.0, help="0 = greedy."),
         seed: int = typer.Option(0, help="Sampling seed (temperature > 0)."),
         trigger: str | None = typer.Option(None, help="The trigger instruction /trigger on puts before every "
                                            "user message (default: params.yaml's backdoor.trigger)."),
         trigger_file: Path | None = typer.Option(None, help="A file holding the trigger instruction."),
         trigger_on: bool = typer.Option(False, "--trigger-on", help="Start with the trigger on."),
         dtype: str = typer.Option("auto", help="auto | float32 | bfloat16 | float16."),
         device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N."),
         root: Path = typer.Option(Path("."), help=ROOT_HELP)) -> None:
    """Chat with a model in the terminal: multi-turn, with /system, /trigger on|off, /steer, /reset,
    /history, /help and /quit (or Ctrl-D)."""
    from persona_ops.inference.chat_session import ChatSession, parse_steer
    from persona_ops.models.loading import model_config, num_layers
    from persona_ops.models.pool import ModelPool
    from persona_ops.pipelines.params import load_params

    try:
        params = load_params(root / "params.yaml")
        instruction = trigger_instruction(trigger, trigger_file, params)
        ref = model_ref(model, revision, adapter, dtype, device, params, root)
        config = model_config(ref.name, ref.revision)
        locate = vector_locator(root)
        layers, hidden = num_layers(config), config.get_text_config().hidden_size
        steering = parse_steer(steer, layers, hidden, aggregate, locate) if steer else None
        loaded = ModelPool().get(ref)
    except InputError as e:
        fail(e)
    described = f"{ref.adapter_source} ({ref.adapter})" if ref.adapter else None
    session = ChatSession(loaded, trigger=instruction, max_new_tokens=max_new_tokens, temperature=temperature,
                          seed=seed, system=system, trigger_on=trigger_on, steering=steering, aggregate=aggregate,
                          locate=locate, adapter=described)
    try:
        code = session.run(sys.stdin, sys.stdout)
    except KeyboardInterrupt:
        typer.echo()
        raise typer.Exit(130) from None
    raise typer.Exit(code)


def trigger_instruction(text: str | None, path: Path | None, params) -> str:
    """``--trigger``, else ``--trigger-file``'s text, else params.yaml's ``backdoor.trigger.instruction``."""
    if text is not None and path is not None:
        raise InputError("--trigger and --trigger-file: expected one of them")
    if path is not None:
        if not path.is_file():
            raise InputError(f"--trigger-file {path}: file not found")
        text = path.read_text(encoding="utf-8")
    if text is not None:
        if not text.strip():
            raise InputError("the trigger instruction is empty")
        return text
    return params.backdoor.trigger.instruction


def model_ref(model: str, revision: str | None, adapter: str | None, dtype: str, device: str, params, root: Path):
    """The model reference, its adapter resolved to a checked local checkpoint as the pipelines do it
    (a registry URI fetched into ``<root>/cache/registry``)."""
    from persona_ops.models.adapters import check_checkpoint, check_fits
    from persona_ops.models.loading import model_config
    from persona_ops.models.refs import ModelRef
    from persona_ops.pipelines.runner import resolve_ref

    ref = ModelRef(name=model, revision=revision, dtype=dtype, device=device, adapter=adapter)
    config = model_config(ref.name, ref.revision)  # the base model exists (its config, not its weights)
    if not adapter:
        return ref
    ref = resolve_ref(ref, "--adapter", params, root)
    try:
        check_fits(check_checkpoint(ref.adapter), config)
    except InputError as e:
        raise InputError(f"--adapter {adapter}: {e}") from None
    return ref


def vector_locator(root: Path):
    """A function giving the local file of a vector: a registry URI's local copy, or a path (relative to
    ``root``, as an adapter's)."""
    from persona_ops.models.refs import REGISTRY_PREFIX
    from persona_ops.pipelines.runner import registered_copy

    def locate(source: str) -> Path:
        return registered_copy(source, root)[0] if source.startswith(REGISTRY_PREFIX) else Path(root) / source

    return locate
