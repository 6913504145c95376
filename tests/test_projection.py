"""Projections of texts onto persona vectors, checked against a direct computation."""

import json

import pytest
import torch

from persona_ops.chat import encode
from persona_ops.errors import InputError
from persona_ops.interp.projection import column, load_texts, project, shift

PROMPTS = ["<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
           "<|im_start|>user\nTell me a story about a fox<|im_end|>\n<|im_start|>assistant\n"]
ANSWERS = ["Hello there, friend.", "Once upon a time a fox ran."]


def test_projection_columns_match_a_direct_computation(tiny_loaded):
    rows = tiny_loaded.num_layers + 1
    g = torch.Generator().manual_seed(0)
    vec = torch.randn(rows, tiny_loaded.hidden_size, generator=g)
    cols = project(tiny_loaded, PROMPTS, ANSWERS, {"evil": vec}, layers=[1, 3])
    assert set(cols) == {column("evil", t, L) for t in ("proj", "prompt_avg_proj", "prompt_last_proj", "cos_sim")
                         for L in (1, 3)}
    for i, (p, a) in enumerate(zip(PROMPTS, ANSWERS)):
        pi, ai = encode(tiny_loaded.tokenizer, p), encode(tiny_loaded.tokenizer, a)
        with torch.no_grad():
            hs = tiny_loaded.model(torch.tensor([pi + ai]), output_hidden_states=True).hidden_states
        for L in (1, 3):
            v = vec[L]
            resp = hs[L][0, len(pi):].mean(0)
            assert cols[column("evil", "proj", L)][i] == pytest.approx(float(resp @ v / v.norm()), rel=1e-4, abs=1e-4)
            assert cols[column("evil", "prompt_last_proj", L)][i] == pytest.approx(
                float(hs[L][0, len(pi) - 1] @ v / v.norm()), rel=1e-4, abs=1e-4)
            assert cols[column("evil", "cos_sim", L)][i] == pytest.approx(
                float(torch.nn.functional.cosine_similarity(resp, v, dim=0)), abs=1e-5)
    same = shift(cols, cols)
    assert set(same) == {f"{c}_shift" for c in cols if "cos_sim" not in c}
    assert all(x == 0 for vals in same.values() for x in vals)
    with pytest.raises(InputError, match="no layer"):
        project(tiny_loaded, PROMPTS, ANSWERS, {"evil": vec}, layers=[rows])


def test_load_texts_reads_chat_jsonl_generations_and_csv(tmp_path, smol_tokenizer):
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "user", "content": "Hi"},
                                             {"role": "assistant", "content": "Hello"}]}) + "\n")
    _, prompts, answers = load_texts(chat, smol_tokenizer)
    assert answers == ["Hello"] and prompts[0].rstrip().endswith("assistant") and "Hi" in prompts[0]
    csv_file = tmp_path / "x.csv"
    csv_file.write_text("prompt,answer\np1,a1\n")
    assert load_texts(csv_file, smol_tokenizer)[1:] == (["p1"], ["a1"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "x"}) + "\n")
    with pytest.raises(InputError, match=r"bad.jsonl:1: expected 'messages'"):
        load_texts(bad, smol_tokenizer)
