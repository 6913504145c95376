"""Interventions: the maths on known vectors, positions under left padding, per-row params, composition."""

from __future__ import annotations

import pytest
import torch

from persona_ops.errors import InputError
from persona_ops.inference.engine import generate_tokens
from persona_ops.inference.sampling import SamplingParams
from persona_ops.interp.interventions import Intervention, Steerer, ablate, add, cap, teacher_forced_masks
from persona_ops.models.loading import LoadedModel, tiny_model


class _Block(torch.nn.Module):
    """A decoder block stand-in returning its input unchanged (HF-style tensor output)."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h


def _identity_stack(n: int = 2) -> torch.nn.ModuleList:
    return torch.nn.ModuleList(_Block() for _ in range(n))


def _run(layers: torch.nn.ModuleList, h: torch.Tensor) -> torch.Tensor:
    for blk in layers:
        h = blk(h)
    return h


def test_operator_maths_on_known_vectors():
    h = torch.tensor([[3.0, 4.0, 0.0]])
    v = torch.tensor([2.0, 0.0, 0.0])
    u = v / v.norm()
    torch.testing.assert_close(h + add(h, v, torch.tensor(0.5)), torch.tensor([[4.0, 4.0, 0.0]]))
    torch.testing.assert_close(h + ablate(h, u, torch.tensor(1.0)), torch.tensor([[0.0, 4.0, 0.0]]))
    torch.testing.assert_close(h + cap(h, u, torch.tensor(1.0)), torch.tensor([[1.0, 4.0, 0.0]]))
    torch.testing.assert_close(h + cap(h, u, torch.tensor(5.0)), h)  # already under the cap
    # paper's floor form: cap on -v at -tau keeps <h, u> >= tau
    torch.testing.assert_close(h + cap(h, -u, torch.tensor(-5.0)), torch.tensor([[5.0, 4.0, 0.0]]))


def test_steerer_applies_ops_at_the_right_block():
    layers = _identity_stack(3)
    h = torch.randn(2, 5, 8)
    v = torch.randn(8)
    with Steerer(layers, [Intervention("add", 2, v, coef=2.0)]) as st:
        st.set_positions(torch.ones(2, 5, dtype=torch.bool), torch.zeros(2, 5, dtype=torch.bool))
        torch.testing.assert_close(layers[0](h), h)  # block 0 = hidden_states[1]: untouched
        torch.testing.assert_close(layers[1](h), h + 2.0 * v)
    torch.testing.assert_close(_run(layers, h), h)  # hooks removed on exit
    with pytest.raises(InputError):
        Steerer(layers, [Intervention("add", 0, v)])
    with pytest.raises(InputError):
        Steerer(layers, [Intervention("add", 4, v)])


def test_ablate_and_cap_through_hooks():
    layers = _identity_stack(1)
    h = torch.randn(3, 4, 16)
    v = torch.randn(16)
    u = v / v.norm()
    allpos = torch.ones(3, 4, dtype=torch.bool)
    with Steerer(layers, [Intervention("ablate", 1, v)]) as st:
        st.set_positions(allpos, allpos)
        out = _run(layers, h)
    assert (out @ u).abs().max() < 1e-5
    torch.testing.assert_close(out + (h @ u)[..., None] * u, h)
    with Steerer(layers, [Intervention("cap", 1, v, tau=0.1)]) as st:
        st.set_positions(allpos, allpos)
        out = _run(layers, h)
    proj = h @ u
    torch.testing.assert_close(out @ u, proj.clamp(max=0.1), atol=1e-5, rtol=1e-5)
    keep = proj <= 0.1
    torch.testing.assert_close(out[keep], h[keep])


def test_positions_under_left_padding():
    layers = _identity_stack(1)
    real = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], dtype=torch.bool)  # row 0 left-padded
    last = torch.zeros_like(real)
    last[:, -1] = True
    h = torch.randn(2, 5, 4)
    v = torch.ones(4)
    changed = {}
    for pos in ("prompt", "response", "all"):
        with Steerer(layers, [Intervention("add", 1, v, coef=1.0, positions=pos)]) as st:
            st.set_positions(real, last)  # a prefill: the last column is each row's last prompt token
            changed[pos] = (_run(layers, h) != h).any(-1)
            st.set_decode()  # a decode step: each row's new token
            step = torch.randn(2, 1, 4)
            changed[pos + "_decode"] = (_run(layers, step) != step).any(-1)
    assert torch.equal(changed["prompt"], real) and torch.equal(changed["all"], real)
    assert torch.equal(changed["response"], last)
    assert not changed["prompt"][0, :2].any()  # padding never edited
    assert not changed["prompt_decode"].any()
    assert changed["response_decode"].all() and changed["all_decode"].all()


def test_teacher_forced_masks_left_and_right_padding():
    right = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    left = right.flip(1)
    for attn in (right, left):
        prompt, response = teacher_forced_masks(attn, [2, 3])
        assert prompt.sum(1).tolist() == [2, 3]
        assert response.sum(1).tolist() == [3, 3]  # last prompt token + answer tokens
        assert not (prompt | response)[attn == 0].any()
        assert ((prompt & response).sum(1) == 1).all()


def test_several_interventions_compose_in_order():
    layers = _identity_stack(2)
    h = torch.randn(2, 3, 8)
    a, b = torch.randn(8), torch.randn(8)
    ub = b / b.norm()
    allpos = torch.ones(2, 3, dtype=torch.bool)
    ivs = [Intervention("add", 1, a, coef=1.5), Intervention("ablate", 1, b), Intervention("add", 2, b, coef=-1.0)]
    with Steerer(layers, ivs) as st:
        st.set_positions(allpos, allpos)
        out = _run(layers, h)
    x = h + 1.5 * a
    x = x - (x @ ub)[..., None] * ub
    torch.testing.assert_close(out, x - b, atol=1e-5, rtol=1e-5)


def test_add_at_coef_zero_is_identity_on_a_model():
    m = tiny_model("qwen3", num_layers=3, hidden=64)
    ids = torch.randint(4, 512, (2, 7))
    with torch.no_grad():
        base = m(ids).logits
        with Steerer(m.model.layers, [Intervention("add", 2, torch.randn(64) * 100, coef=0.0),
                                      Intervention("ablate", 1, torch.randn(64), coef=0.0),
                                      Intervention("cap", 3, torch.randn(64), tau=float("inf"))]) as st:
            st.set_positions(torch.ones(2, 7, dtype=torch.bool), torch.ones(2, 7, dtype=torch.bool))
            steered = m(ids).logits
    assert torch.equal(base, steered)


def test_per_row_coefficients_equal_separate_runs():
    m = tiny_model("llama", num_layers=3, hidden=64, seed=2)
    m.generation_config.eos_token_id = None
    loaded = LoadedModel(model=m, tokenizer=None, label="tiny")
    prompts = [[5, 9, 11, 40], [17, 3, 99, 100, 101, 7], [8]]
    coefs = [0.0, 3.0, -3.0]
    v = torch.randn(64)
    greedy = SamplingParams(max_new_tokens=6, temperature=0.0)
    rows = [p for _ in coefs for p in prompts]
    per_row = torch.tensor(coefs).repeat_interleave(len(prompts))
    together = generate_tokens(loaded, rows, greedy, [Intervention("add", 2, v, coef=per_row, positions="all")],
                               eos_ids=[], batch_size=4)  # batches mix coefficients
    separate = []
    for c in coefs:
        separate += generate_tokens(loaded, prompts, greedy, [Intervention("add", 2, v, coef=c, positions="all")],
                                    eos_ids=[])
    assert together == separate
    assert separate[:3] != separate[3:6]  # the coefficient matters
    with pytest.raises(InputError):
        generate_tokens(loaded, prompts, greedy, [Intervention("add", 2, v, coef=torch.ones(2))], eos_ids=[])
