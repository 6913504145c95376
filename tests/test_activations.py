import torch

from persona_ops.chat import encode
from persona_ops.interp.capture import capture_means


def _reference(loaded, prompt, answer):
    """One sample at a time with every hidden state (persona_vectors' way)."""
    p, a = encode(loaded.tokenizer, prompt), encode(loaded.tokenizer, answer)
    with torch.no_grad():
        hs = loaded.model(torch.tensor([p + a]), output_hidden_states=True).hidden_states
    P = len(p)
    return (torch.stack([h[0, :P].mean(0) for h in hs]), torch.stack([h[0, P:].mean(0) for h in hs]),
            torch.stack([h[0, P - 1] for h in hs]))


def test_batched_capture_equals_per_sample_reference(tiny_loaded):
    prompts = ["<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
               "<|im_start|>system\nYou are evil.<|im_end|>\n<|im_start|>user\nTell me a long story please<|im_end|>\n<|im_start|>assistant\n",
               "<|im_start|>user\nWhy?<|im_end|>\n<|im_start|>assistant\n"]
    answers = ["Hello there.", "Once upon a time, a very long time ago, there was a fox.", "Because."]
    out = capture_means(tiny_loaded, prompts, answers, batch_size=2)
    rows = tiny_loaded.num_layers + 1
    assert out["response_avg"].shape == (3, rows, tiny_loaded.hidden_size)
    for i in range(3):
        p_avg, r_avg, p_last = _reference(tiny_loaded, prompts[i], answers[i])
        torch.testing.assert_close(out["prompt_avg"][i], p_avg, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(out["response_avg"][i], r_avg, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(out["prompt_last"][i], p_last, atol=1e-4, rtol=1e-4)
