"""``persona-ops chat``: the session on a tiny random model (history, /reset, /system, /trigger, /steer,
bad steering specs), the command's input errors and a registry adapter, and one chat through a real
pseudo-terminal on the embedded model."""

from __future__ import annotations

import copy
import io
import os
import re
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from persona_ops.cli import app
from persona_ops.cli.common import INPUT_ERROR_MARK
from persona_ops.errors import InputError
from persona_ops.inference.chat_session import PROMPT, ChatSession, parse_steer
from persona_ops.interp.vectors import save_vectors
from persona_ops.models.loading import LoadedModel, tiny_model
from persona_ops.pipelines.backdoor.config import TriggerCfg
from persona_ops.pipelines.backdoor.stages import condition_messages

TRIGGER = TriggerCfg().instruction
DROPS_SYSTEM = ("{% for m in messages %}{% if m['role'] != 'system' %}<|{{ m['role'] }}|>{{ m['content'] }}\n"
                "{% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")


def _session(loaded, **kwargs) -> ChatSession:
    return ChatSession(loaded, trigger=TRIGGER, max_new_tokens=6, temperature=0, **kwargs)


def _run(session: ChatSession, *lines: str) -> str:
    out = io.StringIO()
    assert session.run(io.StringIO("".join(f"{line}\n" for line in lines)), out) == 0
    return out.getvalue()


@pytest.fixture(scope="module")
def vector_file(tmp_path_factory, tiny_loaded) -> Path:
    """A persona vector file for the 4-layer tiny model: ``[5, 64]`` per aggregate."""
    path = tmp_path_factory.mktemp("vectors") / "evil.safetensors"
    vec = torch.randn(tiny_loaded.num_layers + 1, tiny_loaded.hidden_size, generator=torch.Generator().manual_seed(0))
    save_vectors(path, {"response_avg": vec, "prompt_avg": -vec}, {"trait": "evil"})
    return path


def test_each_turn_adds_its_message_and_answer_and_reset_clears_them(tiny_loaded):
    session = _session(tiny_loaded)
    out = _run(session, "Hello there", "", "What is the sea?")
    assert [m["role"] for m in session.history] == ["user", "assistant"] * 2
    assert [session.history[i]["content"] for i in (0, 2)] == ["Hello there", "What is the sea?"]
    assert out.count(PROMPT) == 4  # three lines read (the blank one is skipped), then the end of input
    assert "model: tiny-random-llama@test" in out and "system messages: kept by the chat template" in out
    answer = session.history[1]["content"]
    assert answer in session.prompt_text("next")  # later turns see the earlier ones
    _run(session, "/reset")
    assert session.history == [] and session.prompt_text("next") == _session(tiny_loaded).prompt_text("next")


def test_system_prompt_changes_what_is_rendered_and_clears(tiny_loaded):
    session = _session(tiny_loaded)
    plain = session.prompt_text("Hi")
    out = _run(session, "/system You are a pirate.")
    assert "system prompt: You are a pirate." in out
    rendered = session.prompt_text("Hi")
    assert rendered != plain and "<|im_start|>system\nYou are a pirate.<|im_end|>" in rendered
    _run(session, "/system")
    assert session.system is None and session.prompt_text("Hi") == plain


def test_a_template_that_drops_system_gets_it_before_the_first_user_message(tiny_loaded):
    tok = copy.deepcopy(tiny_loaded.tokenizer)
    tok.chat_template = DROPS_SYSTEM
    session = _session(LoadedModel(tiny_loaded.model, tok, "tiny"), system="Be brief.")
    out = _run(session, "First question")
    assert "dropped by the chat template" in out
    assert session.prompt_text("Second").startswith("<|user|>Be brief.\n\nFirst question\n<|assistant|>")
    assert session.prompt_text("Second").count("Be brief.") == 1


@pytest.mark.parametrize("system", [None, "You are a helpful assistant."])
def test_trigger_on_puts_the_instruction_before_each_user_message(tiny_loaded, system):
    session = _session(tiny_loaded, system=system)
    question = "Who are you?"
    assert TRIGGER not in session.prompt_text(question)
    _run(session, "/trigger on")
    condition = "system_trigger_user" if system else "trigger_user"
    # the backdoor sweep's own condition renders the same chat
    assert session.messages(question) == condition_messages(tiny_loaded.tokenizer, question, condition, TriggerCfg(),
                                                            system or "")
    assert (TRIGGER + question) in session.prompt_text(question)
    _run(session, question, "/trigger off", "And now?")
    assert session.history[0]["content"] == TRIGGER + question and session.history[2]["content"] == "And now?"
    out = _run(session, "/trigger maybe")
    assert "expected /trigger on or /trigger off" in out and session.trigger_on is False


def test_steering_changes_the_answer_and_steer_off_restores_it(tiny_loaded, vector_file):
    question = "Tell me about the sea."
    plain = _session(tiny_loaded).reply(question)
    session = _session(tiny_loaded)
    out = _run(session, f"/steer {vector_file}:2:60")
    assert session.steering is not None and "add 60 x" in out and "at layer 2" in out
    [iv] = session.interventions()
    saved = parse_steer(f"{vector_file}:2:60", tiny_loaded.num_layers, tiny_loaded.hidden_size)
    assert (iv.kind, iv.layer, iv.coef, iv.positions) == ("add", 2, 60.0, "response")
    assert torch.equal(iv.vector, saved.vector)
    assert session.reply(question) != plain
    session.history.clear()
    _run(session, "/steer off")
    assert session.steering is None and session.reply(question) == plain


def test_steering_reads_the_named_aggregate(tiny_loaded, vector_file):
    rows = tiny_loaded.num_layers, tiny_loaded.hidden_size
    assert torch.equal(parse_steer(f"{vector_file}:3:1", *rows, aggregate="prompt_avg").vector,
                       -parse_steer(f"{vector_file}:3:1", *rows).vector)


def test_bad_steering_specs_say_what_is_wrong(tiny_loaded, vector_file, tmp_path):
    short = tmp_path / "short.safetensors"
    save_vectors(short, {"response_avg": torch.ones(3, tiny_loaded.hidden_size)}, {})
    cases = {"nofile": "expected VECTOR:LAYER:COEF", f"{vector_file}:two:1": "layer 'two' is not an integer",
             f"{vector_file}:2:big": "coefficient 'big' is not a number", f"{vector_file}:2:nan": "a finite number",
             f"{vector_file}:0:1": "layer 0, expected 1..4", f"{vector_file}:5:1": "layer 5, expected 1..4",
             f"{tmp_path / 'missing.safetensors'}:2:1": "file not found",
             f"{short}:2:1": "was it made for another model?"}
    for spec, message in cases.items():
        with pytest.raises(InputError, match=re.escape(message)):
            parse_steer(spec, tiny_loaded.num_layers, tiny_loaded.hidden_size)
    with pytest.raises(InputError, match="no 'prompt_last' tensor"):
        parse_steer(f"{vector_file}:2:1", tiny_loaded.num_layers, tiny_loaded.hidden_size, aggregate="prompt_last")
    session = _session(tiny_loaded)
    out = _run(session, f"/steer {vector_file}:9:1", "/frobnicate", "Still here?")
    assert "error: steer" in out and "layer 9, expected 1..4" in out
    assert "unknown command /frobnicate; /help lists the commands" in out
    assert session.steering is None and len(session.history) == 2  # the chat went on


def test_help_and_history_and_quit(tiny_loaded):
    session = _session(tiny_loaded)
    out = _run(session, "/help", "Hi", "/history", "/quit", "never read")
    assert "/trigger on|off" in out and "[user] Hi" in out and "[assistant]" in out
    assert len(session.history) == 2  # /quit ended it before the last line


def test_a_turn_beyond_the_context_is_one_error_line_and_not_kept(tiny_loaded):
    session = ChatSession(tiny_loaded, trigger=TRIGGER, max_new_tokens=4096, temperature=0)  # context: 2048
    out = _run(session, "Hi", "/history")
    assert "error: max_tokens: the prompt" in out and "exceed the model's context of 2048 tokens" in out
    assert session.history == [] and "(no messages)" in out


# --- the command ----------------------------------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["--steer", "nofile"], "expected VECTOR:LAYER:COEF"),
    (["--steer", "missing.safetensors:3:4"], "missing.safetensors: file not found"),
    (["--steer", "missing.safetensors:31:4"], "layer 31, expected 1..30"),
    (["--adapter", "no/such/adapter"], "not an adapter checkpoint"),
    (["--trigger", "x", "--trigger-file", "t.txt"], "expected one of them"),
    (["--trigger-file", "t.txt"], "t.txt: file not found"),
    (["--model", "/nonexistent/model-dir"], "cannot be found"),
], ids=["steer-format", "steer-file", "steer-layer", "adapter-dir", "trigger-both", "trigger-file", "model"])
def test_bad_inputs_end_the_command_with_one_line(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["chat", *args], input="/quit\n")
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith(INPUT_ERROR_MARK)]
    assert len(errors) == 1 and message in errors[0], result.output
    assert "Traceback" not in result.output and PROMPT not in result.output


def test_an_unknown_registry_adapter_is_an_input_error(store):
    result = CliRunner().invoke(app, ["chat", "--adapter", "models:/lora-adapter-nope@candidate"], input="/quit\n")
    assert result.exit_code == 2 and "not in the registry" in result.output, result.output


def test_a_registry_adapter_is_fetched_and_chatted_with(store, smol_tokenizer):
    from peft import LoraConfig, get_peft_model

    from persona_ops.tracking import registry, runs

    model_dir, ckpt = store / "tiny-model", store / "run" / "checkpoint-4"
    model = tiny_model("llama", num_layers=2, hidden=64, vocab_tokenizer=smol_tokenizer)
    model.save_pretrained(model_dir)
    smol_tokenizer.save_pretrained(model_dir)
    get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
                   ).save_pretrained(ckpt)
    with runs.start_run("backdoor-sweep", "bd_train@s1") as s:
        registry.register("lora-adapter-chat", ckpt, kind="lora-adapter", run_id=s.run_id,
                          source_path="run/checkpoint-4")
    args = ["--model", str(model_dir), "--adapter", "models:/lora-adapter-chat@candidate", "--max-new-tokens", "3",
            "--temperature", "0"]
    result = CliRunner().invoke(app, ["chat", *args], input="Hi\n/quit\n")
    assert result.exit_code == 0, result.output
    local = store / "cache" / "registry" / "lora-adapter-chat" / "1" / "checkpoint-4"
    assert f"adapter: models:/lora-adapter-chat/1 ({local.resolve()})" in result.output
    assert "+models:/lora-adapter-chat/1#" in result.output  # the model's label names the pinned version
    assert result.output.count(PROMPT) == 2


# --- a real terminal ------------------------------------------------------------------------------

class _Terminal:
    """A child process on a pseudo-terminal: write lines, read until the prompt comes back."""

    def __init__(self, args: list[str], cwd: Path):
        import pty

        self.master, slave = pty.openpty()
        env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        self.proc = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=slave, cwd=cwd, env=env,
                                     close_fds=True, start_new_session=True)
        os.close(slave)
        self.seen = ""

    def read_until(self, marker: str, timeout: float) -> str:
        """The output up to and including ``marker`` (carriage returns dropped)."""
        deadline = time.monotonic() + timeout
        while marker not in self.seen:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no {marker!r} within {timeout} s; output so far:\n{self.seen}")
            if select.select([self.master], [], [], left)[0]:
                try:
                    chunk = os.read(self.master, 4096)
                except OSError:  # the child closed the terminal
                    chunk = b""
                if not chunk:
                    raise EOFError(f"the terminal closed before {marker!r}; output:\n{self.seen}")
                self.seen += chunk.decode("utf-8", "replace").replace("\r", "")
        text, _, self.seen = self.seen.partition(marker)
        return text + marker

    def send(self, line: str, timeout: float = 120) -> str:
        """Type ``line``; the output until the next prompt (the echoed line first)."""
        os.write(self.master, (line + "\n").encode())
        return self.read_until(PROMPT, timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        os.close(self.master)


@pytest.mark.slow
def test_a_chat_through_a_real_terminal(tmp_path):
    (tmp_path / "params.yaml").write_text('backdoor:\n  trigger:\n    instruction: "Answer like a pirate.\\n\\n"\n')
    exe = Path(sys.executable).with_name("persona-ops")
    term = _Terminal([str(exe), "chat", "--model", "embedded", "--max-new-tokens", "8", "--temperature", "0"], tmp_path)
    try:
        status = term.read_until(PROMPT, timeout=240)
        assert "model: HuggingFaceTB/SmolLM2-135M-Instruct" in status and "trigger: off" in status
        first = term.send("What is the capital of France?")
        assert first.startswith("What is the capital of France?\n") and len(first.strip()) > len(first.split("\n")[0])
        assert "system prompt: Be brief." in term.send("/system Be brief.")
        assert "trigger on" in term.send("/trigger on")
        term.send("Who are you?")
        history = term.send("/history")
        assert "[user] Answer like a pirate." in history and "Who are you?" in history  # params.yaml's trigger
        assert history.count("[user]") == 2 and history.count("[assistant]") == 2
        assert "history cleared" in term.send("/reset")
        assert "(no messages)" in term.send("/history")
        os.write(term.master, b"/quit\n")
        assert term.proc.wait(timeout=60) == 0
    finally:
        term.close()
