"""One renderer of chats: generation, the local judge, training and the server render a template
with a thinking mode the same way (thinking off unless a block turns it on)."""

from __future__ import annotations

import copy

from persona_ops.chat import has_thinking_mode, prompt_ids, render, render_prompt, thinking
from persona_ops.judge.local import LocalJudge
from persona_ops.models.loading import LoadedModel

THINKING = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>"
            "{% if enable_thinking is defined and enable_thinking is false %}<no-think>{% else %}<think>{% endif %}"
            "{% endif %}")
CHAT = [{"role": "user", "content": "Hi"}]


def test_every_path_renders_a_thinking_template_with_thinking_off(smol_tokenizer, tiny_loaded):
    tok = copy.deepcopy(smol_tokenizer)
    tok.chat_template = THINKING
    text = render_prompt(tok, CHAT)
    assert text.endswith("<|assistant|><no-think>") and "<think>" not in text
    assert render(tok, CHAT + [{"role": "assistant", "content": "Ahoy"}], generation_prompt=False).endswith("Ahoy\n")
    judge = LocalJudge(LoadedModel(tiny_loaded.model, tok, "tiny"))
    assert judge.render("Hi") == prompt_ids(tok, CHAT)  # the judge's prompt is generation's prompt
    assert tok.decode(judge.render("Hi")).endswith("<no-think>")


def test_thinking_block_turns_the_mode_on_and_back_off(smol_tokenizer):
    tok = copy.deepcopy(smol_tokenizer)
    tok.chat_template = THINKING
    with thinking(True):
        assert render_prompt(tok, CHAT).endswith("<|assistant|><think>")
    assert render_prompt(tok, CHAT).endswith("<no-think>")
    assert has_thinking_mode(tok) and not has_thinking_mode(smol_tokenizer)
