"""Activation capping on the Assistant Axis: tau from the default projections, the spec file,
and capped forwards / generation on a tiny model."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from persona_ops.errors import InputError
from persona_ops.interp.capping import CappingSpec, compute_capping, layer_range, load_capping, save_capping

H = 64  # tiny_loaded's hidden size (4 layers)


def _axis_and_default(seed: int = 0, rows: int = 5, n: int = 40):
    g = torch.Generator().manual_seed(seed)
    axis = torch.randn(rows, H, generator=g)
    default = torch.randn(n, rows, H, generator=g) + 0.5 * axis
    return axis, default


def test_tau_is_the_numpy_percentile_of_the_default_projections():
    axis, default = _axis_and_default()
    spec = compute_capping(axis, range(5), default, range(5), layers=[1, 3], percentile=25, num_layers=4)
    assert spec.layers == [1, 3] and tuple(spec.vectors.shape) == (2, H)
    for i, layer in enumerate([1, 3]):
        u = axis[layer].double() / axis[layer].double().norm()
        proj = (default[:, layer].double() @ u).numpy()
        floor = np.percentile(proj, 25)
        assert float(spec.floors[i]) == pytest.approx(floor, abs=1e-5)
        # the stored direction points away from the Assistant; its ceiling tau is the negated floor
        torch.testing.assert_close(spec.vectors[i].double(), -u, rtol=0, atol=1e-6)
        assert float(spec.tau[i]) == pytest.approx(-floor, abs=1e-5)
        assert (proj < floor).mean() == pytest.approx(0.25, abs=0.03)


def test_layers_must_be_captured_and_editable():
    axis, default = _axis_and_default()
    with pytest.raises(InputError, match=r"\[7\] were not captured"):
        compute_capping(axis, [0, 1, 2, 3, 4], default, range(5), layers=[4, 7], percentile=25, num_layers=8)
    with pytest.raises(InputError, match=r"\[0\] outside 1\.\.4"):
        compute_capping(axis, range(5), default, range(5), layers=[0], percentile=25, num_layers=4)
    assert layer_range([2, 4], 9) == [2, 3, 4] and layer_range(None, 9) == [9]


def test_spec_file_roundtrip_and_bad_file(tmp_path):
    axis, default = _axis_and_default(1)
    spec = compute_capping(axis, range(5), default, range(5), layers=[2, 3], percentile=10, num_layers=4)
    path = tmp_path / "capping.safetensors"
    save_capping(path, spec, {"model": "tiny@x"})
    back = load_capping(path)
    assert back.layers == [2, 3] and back.percentile == 10 and back.metadata["model"] == "tiny@x"
    torch.testing.assert_close(back.vectors, spec.vectors)
    torch.testing.assert_close(back.tau, spec.tau)
    back.check_fits(num_layers=4, hidden_size=H)
    with pytest.raises(InputError, match="another model"):
        back.check_fits(num_layers=2, hidden_size=H, source=str(path))
    (tmp_path / "capping.json").write_text("{}")
    with pytest.raises(InputError, match="not a capping spec"):
        load_capping(tmp_path / "capping.json")
    with pytest.raises(InputError, match="file not found"):
        load_capping(tmp_path / "missing.safetensors")


def _tiny_spec(loaded, tau_quantile: float = 0.5) -> CappingSpec:
    """A spec at layers 1..3 whose tau bites: the median of the model's own projections."""
    prompt = loaded.tokenizer("Tell me about the sea and its many ships.", return_tensors="pt").input_ids
    with torch.no_grad():
        hs = loaded.model(prompt, output_hidden_states=True).hidden_states
    g = torch.Generator().manual_seed(3)
    vectors = torch.nn.functional.normalize(torch.randn(3, loaded.hidden_size, generator=g), dim=-1)
    tau = torch.stack([(hs[L][0] @ vectors[L - 1]).quantile(tau_quantile) for L in (1, 2, 3)])
    return CappingSpec(layers=[1, 2, 3], vectors=vectors, tau=tau, percentile=50.0)


def _projections(loaded, ids: torch.Tensor, spec: CappingSpec, interventions) -> list[torch.Tensor]:
    """Per capped layer, ``<h, v>`` at every position of a teacher-forced forward, read by a hook
    registered after the steerer's (so it sees the block output the next block receives)."""
    from persona_ops.interp.interventions import Steerer

    seen: dict[int, torch.Tensor] = {}
    everything = torch.ones_like(ids, dtype=torch.bool)
    with torch.no_grad(), Steerer(loaded.layers, interventions) as steerer:
        steerer.set_positions(everything, everything)
        handles = [loaded.layers[L - 1].register_forward_hook(
            lambda m, a, out, L=L: seen.__setitem__(L, out[0] if isinstance(out, tuple) else out))
            for L in spec.layers]
        try:
            loaded.model(ids)
        finally:
            for h in handles:
                h.remove()
    return [seen[L][0].float() @ spec.vectors[i] for i, L in enumerate(spec.layers)]


def test_capped_forward_never_exceeds_tau(tiny_loaded):
    spec = _tiny_spec(tiny_loaded)
    ids = tiny_loaded.tokenizer("Pirates sail the seas; ghosts haunt the old ship at night.",
                                return_tensors="pt").input_ids
    uncapped = _projections(tiny_loaded, ids, spec, [])
    assert any(bool((p > t + 1e-3).any()) for p, t in zip(uncapped, spec.tau))  # the cap has work to do
    for proj, tau in zip(_projections(tiny_loaded, ids, spec, spec.interventions()), spec.tau):
        assert float(proj.max()) <= float(tau) + 1e-4


def test_capped_generation_with_infinite_tau_equals_uncapped(tiny_loaded):
    from persona_ops.chat import chat_messages, render_prompt
    from persona_ops.inference.engine import generate_text
    from persona_ops.inference.sampling import SamplingParams

    tok = tiny_loaded.tokenizer
    prompts = [render_prompt(tok, chat_messages(tok, None, q)) for q in ("Who are you?", "Describe the sea.")]
    sampling = SamplingParams(max_new_tokens=8, temperature=1.0, top_p=1.0, seed=7)
    plain = generate_text(tiny_loaded, prompts, sampling)
    spec = _tiny_spec(tiny_loaded)
    inf = dataclasses.replace(spec, tau=torch.full_like(spec.tau, float("inf")))
    assert generate_text(tiny_loaded, prompts, sampling, inf.interventions()) == plain
    # a cap at the 5th percentile of the model's own projections changes what it says
    low = _tiny_spec(tiny_loaded, tau_quantile=0.05)
    assert generate_text(tiny_loaded, prompts, sampling, low.interventions()) != plain


def test_server_caps_every_request_unless_it_opts_out(tiny_loaded):
    from fastapi.testclient import TestClient

    from persona_ops.inference.server import create_app

    def ask(app, **extra):
        body = {"messages": [{"role": "user", "content": "Who are you?"}], "max_tokens": 8, "temperature": 0,
                "logprobs": True, **extra}
        resp = TestClient(app).post("/v1/chat/completions", json=body)
        return resp.status_code, resp.json()

    def answer(result):
        status, body = result
        assert status == 200, body
        choice = body["choices"][0]
        return choice["message"]["content"], [t["logprob"] for t in choice["logprobs"]["content"]]

    spec = _tiny_spec(tiny_loaded, tau_quantile=0.05)
    capped_app, plain_app = create_app(tiny_loaded, capping=spec.interventions()), create_app(tiny_loaded)
    plain = answer(ask(plain_app))
    assert answer(ask(capped_app, capping=False)) == plain
    assert answer(ask(capped_app)) != plain
    status, body = ask(plain_app, capping=True)
    assert status == 400 and "--capping" in body["error"]["message"]
