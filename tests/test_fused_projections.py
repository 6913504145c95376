"""Fused q/k/v and gate/up projections give the model's own outputs (forced on for the CPU here)."""

from __future__ import annotations

import pytest
import torch

from persona_ops.inference.engine import generate_tokens
from persona_ops.inference.sampling import SamplingParams
from persona_ops.kernels import cpu_linear, fused_projections as fp
from persona_ops.models.loading import LoadedModel, tiny_model


@pytest.fixture
def on_cpu(monkeypatch):
    monkeypatch.setattr(fp, "DEVICE_TYPES", ("cuda", "cpu"))
    monkeypatch.setattr(cpu_linear, "ENABLED", False)  # the packed CPU linears would take these layers


@pytest.mark.parametrize("arch", ["llama", "qwen3", "olmo2"])
def test_fused_forward_and_generation_equal_the_plain_model(on_cpu, arch):
    model = tiny_model(arch, num_layers=2, hidden=64, seed=1)
    ids = torch.randint(0, 512, (3, 9), generator=torch.Generator().manual_seed(0))
    loaded = LoadedModel(model, None, arch)
    greedy = SamplingParams(max_new_tokens=8, temperature=0.0)
    with torch.no_grad():
        want = model(input_ids=ids).logits
    want_tokens = generate_tokens(loaded, ids.tolist(), greedy, eos_ids=[])

    calls = []  # the weight shapes of every F.linear
    attn = model.model.layers[0].self_attn
    original = torch.nn.functional.linear

    def counting(x, w, b=None):
        calls.append(tuple(w.shape))
        return original(x, w, b)

    with fp.fused_projections(model), torch.no_grad():
        torch.nn.functional.linear = counting
        try:
            got = model(input_ids=ids).logits
        finally:
            torch.nn.functional.linear = original
        q, k, v = attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight
        assert q.untyped_storage().data_ptr() == k.untyped_storage().data_ptr() == v.untyped_storage().data_ptr()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    mlp = model.model.layers[0].mlp
    qkv = (q.shape[0] + k.shape[0] + v.shape[0], q.shape[1])
    gate_up = (mlp.gate_proj.out_features + mlp.up_proj.out_features, mlp.gate_proj.in_features)
    assert calls.count(qkv) == calls.count(gate_up) == 2  # one GEMM each per block
    assert len(calls) == 2 * 4 + 1  # per block: q/k/v, o, gate/up, down; and the LM head
    assert "forward" not in attn.q_proj.__dict__  # the layers are plain again after the context
    assert generate_tokens(loaded, ids.tolist(), greedy, eos_ids=[]) == want_tokens  # fused inside generation
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)


def test_autograd_takes_the_plain_path_and_replaced_weights_are_restacked(on_cpu):
    model = tiny_model("llama", num_layers=1, hidden=32, seed=2)
    ids = torch.randint(0, 512, (2, 5), generator=torch.Generator().manual_seed(1))
    with fp.fused_projections(model):
        model(input_ids=ids).logits.sum().backward()
    attn = model.model.layers[0].self_attn
    assert attn.k_proj.weight.grad is not None and attn.k_proj.weight.grad.abs().sum() > 0
    attn.k_proj.weight = torch.nn.Parameter(torch.randn_like(attn.k_proj.weight))  # a new tensor, not a view
    with torch.no_grad():
        want = model(input_ids=ids).logits
        with fp.fused_projections(model):
            got = model(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_a_fused_model_is_freed_with_its_last_reference(on_cpu):
    import gc
    import weakref

    model = tiny_model("llama", num_layers=1, hidden=32, seed=3)
    with fp.fused_projections(model), torch.no_grad():
        model(input_ids=torch.tensor([[5, 6, 7]]))
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None
