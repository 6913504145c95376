from persona_ops.chat import article, chat_messages, persona_system_prompt, render_prompt
from persona_ops.inference.engine import generate_text as generate
from persona_ops.inference.sampling import SamplingParams


def test_system_prompt_wording():
    assert persona_system_prompt("evil", "Be cruel.") == "You are an evil assistant. Be cruel."
    assert article("sycophantic") == "a"


def test_render_keeps_system_when_template_supports_it(smol_tokenizer):
    text = render_prompt(smol_tokenizer, chat_messages(smol_tokenizer, "SYS", "USER"))
    assert text.index("SYS") < text.index("USER") and text.rstrip().endswith("assistant")


def test_seeded_generation_is_reproducible_and_batch_independent_when_greedy(tiny_loaded):
    tok = tiny_loaded.tokenizer
    prompts = [render_prompt(tok, chat_messages(tok, None, q)) for q in ("Hi", "Tell me about the sea and the sky", "Why?")]
    sampled = SamplingParams(max_new_tokens=6, temperature=1.0, seed=3)
    assert generate(tiny_loaded, prompts, sampled, batch_size=2) == generate(tiny_loaded, prompts, sampled, batch_size=2)
    greedy = SamplingParams(max_new_tokens=6, temperature=0.0)
    batched = generate(tiny_loaded, prompts, greedy, batch_size=3)
    single = [generate(tiny_loaded, [p], greedy, batch_size=1)[0] for p in prompts]
    assert batched == single  # left padding does not change a row's output
