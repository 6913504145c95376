"""An interactive chat with a local model: multi-turn history, a system prompt, the backdoor sweep's
formatting trigger before each user message, additive steering with a persona vector, slash commands.

The loop reads lines from one text stream and writes to another, so ``persona-ops chat`` runs it on
the terminal and tests run it on strings. Prompts are rendered as everywhere (:mod:`persona_ops.chat`):
a template that drops system messages gets the system prompt before the first user message.
Answers come from the generation engine through the server's chat sampler (one local generation
path); model text is printed with control characters escaped, newlines kept.

Steering: ``VECTOR:LAYER:COEF`` adds ``COEF`` times row ``LAYER`` of a persona vector file's aggregate
(``response_avg`` by default) at ``hidden_states[LAYER]`` (the output of decoder block ``LAYER-1``;
``1 <= LAYER <= num_layers``), at the response positions (the last prompt token and every generated one).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import torch

from persona_ops.chat import chat_messages, keeps_system, prompt_ids, render_prompt
from persona_ops.errors import InputError
from persona_ops.interp.interventions import Intervention
from persona_ops.models.loading import LoadedModel
from persona_ops.names import printable

PROMPT = "you> "
STEER_FORMAT = "VECTOR:LAYER:COEF (a vector file, a hidden_states layer index, a number)"
HELP = """commands:
  /system TEXT        set or replace the system prompt (/system alone clears it)
  /trigger on|off     put the backdoor trigger instruction before every user message, or stop
  /steer VECTOR:LAYER:COEF   add COEF x the persona vector's row LAYER at hidden_states[LAYER]
  /steer off          stop steering
  /reset              clear the history (settings stay)
  /history            show the history
  /help               this list
  /quit               end the chat (also Ctrl-D)
A setting applies from the next message on; the history keeps each message as it was sent."""


@dataclass(frozen=True)
class Steering:
    """Additive steering: ``coef`` x ``vector`` (one row of a persona vector) at ``layer``."""

    source: str  # the vector file (or registry URI) as given
    aggregate: str
    layer: int
    coef: float
    vector: torch.Tensor  # [hidden]

    def intervention(self) -> Intervention:
        return Intervention("add", self.layer, self.vector, coef=self.coef, positions="response")

    def describe(self) -> str:
        return (f"add {self.coef:g} x {printable(self.source)} ({self.aggregate}) at layer {self.layer} "
                "(hidden_states index), response positions")


def parse_steer(spec: str, num_layers: int, hidden_size: int, aggregate: str = "response_avg",
                locate: Callable[[str], Path] = Path) -> Steering:
    """The steering ``VECTOR:LAYER:COEF`` names for a model of ``num_layers`` blocks and ``hidden_size``;
    ``locate`` turns ``VECTOR`` into a local file. InputError naming what is wrong."""
    from persona_ops.inference.server import check_vector
    from persona_ops.interp.vectors import load_aggregate

    where = f"steer {printable(spec)!r}"
    parts = spec.rsplit(":", 2)  # the file name may hold colons (a registry URI does)
    if len(parts) != 3 or not parts[0]:
        raise InputError(f"{where}: expected {STEER_FORMAT}")
    source, layer_text, coef_text = parts
    try:
        layer = int(layer_text)
    except ValueError:
        raise InputError(f"{where}: layer {printable(layer_text)!r} is not an integer, expected "
                         f"{STEER_FORMAT}") from None
    try:
        coef = float(coef_text)
    except ValueError:
        raise InputError(f"{where}: coefficient {printable(coef_text)!r} is not a number, expected "
                         f"{STEER_FORMAT}") from None
    if not math.isfinite(coef):
        raise InputError(f"{where}: coefficient {coef_text!r}, expected a finite number")
    if not 1 <= layer <= num_layers:
        raise InputError(f"{where}: layer {layer}, expected 1..{num_layers} (layer L = hidden_states[L]; "
                         f"the model has {num_layers} blocks)")
    path = locate(source)
    vectors = load_aggregate(path, aggregate)
    check_vector(vectors, num_layers, hidden_size, str(path))
    return Steering(source, aggregate, layer, coef, vectors[layer])


class ChatSession:
    """A chat's settings and history, and the loop that reads user lines and slash commands.

    ``trigger`` is the instruction ``/trigger on`` puts before every user message (``instruction +
    message``, as the backdoor sweep's ``trigger_user`` condition); ``locate`` turns a ``/steer``
    vector into a local file; ``adapter`` only describes the model in the status lines."""

    def __init__(self, loaded: LoadedModel, *, trigger: str, max_new_tokens: int = 256, temperature: float = 0.7,
                 seed: int = 0, system: str | None = None, trigger_on: bool = False, steering: Steering | None = None,
                 aggregate: str = "response_avg", locate: Callable[[str], Path] = Path, adapter: str | None = None):
        self.loaded, self.trigger, self.trigger_on = loaded, trigger, trigger_on
        self.max_new_tokens, self.temperature, self.seed = max_new_tokens, temperature, seed
        self.system, self.steering, self.aggregate, self.locate = system or None, steering, aggregate, locate
        self.adapter = adapter
        self.history: list[dict] = []  # user and assistant messages, each user message as it was sent

    # --- what is sent ---
    def user_message(self, line: str) -> dict:
        return {"role": "user", "content": self.trigger + line if self.trigger_on else line}

    def messages(self, line: str) -> list[dict]:
        """The chat for the next user line: the system prompt, the history and the new message."""
        turns = [*self.history, self.user_message(line)]
        if not self.system:
            return turns
        return chat_messages(self.loaded.tokenizer, self.system, turns[0]["content"]) + turns[1:]

    def prompt_text(self, line: str) -> str:
        """The rendered text the model is given for the next user line (up to the generation prompt)."""
        return render_prompt(self.loaded.tokenizer, self.messages(line))

    def interventions(self) -> list[Intervention]:
        return [self.steering.intervention()] if self.steering else []

    def reply(self, line: str) -> str:
        """The model's answer to ``line``; the message and the answer join the history."""
        from persona_ops.inference.engine import generate_tokens
        from persona_ops.inference.sampling import SamplingParams
        from persona_ops.inference.server import token_budget

        tok = self.loaded.tokenizer
        prompt = prompt_ids(tok, self.messages(line))
        context = getattr(self.loaded.model.config, "max_position_embeddings", None) or 10 ** 9
        budget = token_budget(len(prompt), self.max_new_tokens, 1, context)  # InputError beyond the context
        sampling = SamplingParams(budget, self.temperature, 1.0, self.seed)
        ids = generate_tokens(self.loaded, [prompt], sampling, self.interventions(),
                              compile_blocks=False)  # a first reply without a compile's wait
        answer = tok.decode(ids[0], skip_special_tokens=True).strip()
        self.history += [self.user_message(line), {"role": "assistant", "content": answer}]
        return answer

    # --- the loop ---
    def run(self, stdin: TextIO, stdout: TextIO) -> int:
        """Read lines until ``/quit`` or the end of input; return the exit status (0)."""
        out = _Writer(stdout)
        out.line(self.status())
        while True:
            out.write(PROMPT)
            line = stdin.readline()
            if not line:
                out.line("")
                return 0
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            if line.lstrip().startswith("/"):
                if self.command(line.strip(), out):
                    return 0
                continue
            try:
                answer = self.reply(line)
            except InputError as e:
                out.line(f"error: {printable(str(e))} (the message is not kept; /reset starts a new chat)")
                continue
            except KeyboardInterrupt:
                out.line("\n(interrupted: the message is not kept)")
                continue
            out.line("\n".join(printable(part) for part in answer.split("\n")) + "\n")

    def command(self, text: str, out: _Writer) -> bool:
        """Run a slash command; True when the chat ends."""
        name, _, arg = text.partition(" ")
        arg = arg.strip()
        if name == "/quit":
            return True
        if name == "/help":
            out.line(HELP)
        elif name == "/reset":
            self.history.clear()
            out.line("history cleared")
        elif name == "/history":
            out.line(self.history_text())
        elif name == "/system":
            self.system = arg or None
            out.line(f"system prompt: {printable(arg)}" if arg else "system prompt cleared")
        elif name == "/trigger" and arg in ("on", "off"):
            self.trigger_on = arg == "on"
            out.line(f"trigger {arg}")
        elif name == "/trigger":
            out.line(f"trigger is {'on' if self.trigger_on else 'off'}; expected /trigger on or /trigger off")
        elif name == "/steer":
            self.steer_command(arg, out)
        else:
            out.line(f"unknown command {printable(name)}; /help lists the commands")
        return False

    def steer_command(self, arg: str, out: _Writer) -> None:
        if arg == "off":
            self.steering = None
            out.line("steering off")
            return
        if not arg:
            out.line(f"steering: {self.steering.describe() if self.steering else 'off'}; "
                     f"/steer {STEER_FORMAT} or /steer off")
            return
        try:
            self.steering = parse_steer(arg, self.loaded.num_layers, self.loaded.hidden_size, self.aggregate,
                                        self.locate)
        except InputError as e:
            out.line(f"error: {printable(str(e))}")
            return
        out.line(f"steering: {self.steering.describe()}")

    def history_text(self) -> str:
        if not self.history:
            return "(no messages)"
        return "\n".join(f"[{m['role']}] " + "\n  ".join(printable(p) for p in m["content"].split("\n"))
                         for m in self.history)

    def status(self) -> str:
        """What the chat runs with: the model, adapter, steering, system prompt, trigger and sampling."""
        tok = self.loaded.tokenizer
        system_handling = ("kept by the chat template" if keeps_system(tok) else
                           "dropped by the chat template: the system prompt goes before the first user message")
        sampling = ("greedy" if self.temperature == 0 else f"temperature {self.temperature:g}, seed {self.seed}")
        return "\n".join([
            f"model: {printable(self.loaded.label)}",
            f"adapter: {printable(self.adapter) if self.adapter else 'none'}",
            f"steering: {self.steering.describe() if self.steering else 'off'}",
            f"system messages: {system_handling}",
            f"system prompt: {printable(self.system) if self.system else 'none'}",
            f"trigger: {'on' if self.trigger_on else 'off'}",
            f"sampling: {sampling}, at most {self.max_new_tokens} new tokens",
            "/help lists the commands; /quit or Ctrl-D ends the chat."])


class _Writer:
    """Writes and flushes (the prompt must show before input is read)."""

    def __init__(self, stream: TextIO):
        self.stream = stream

    def write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()

    def line(self, text: str) -> None:
        self.write(text + "\n")
