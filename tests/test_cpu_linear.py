"""CPU linear layers on packed oneDNN weights: same results, autograd untouched, repacking."""

import pytest
import torch

from persona_ops import cpu_linear
from persona_ops.cpu_linear import packed_linears
from persona_ops.models import tiny_model

pytestmark = pytest.mark.skipif(not cpu_linear.available(), reason="no oneDNN in this torch build")


def _patched(model):
    return [m for m in model.modules() if "forward" in m.__dict__]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_same_logits_and_restored(dtype, tol):
    model = tiny_model("llama", num_layers=2, hidden=64).to(dtype)
    ids = torch.randint(4, 500, (3, 17))
    with torch.inference_mode():
        plain = model(input_ids=ids).logits.float()
        with packed_linears(model):
            n_linear = sum(type(m) is torch.nn.Linear for m in model.modules())
            assert len(_patched(model)) == n_linear > 0
            packed = model(input_ids=ids).logits.float()
    assert not _patched(model)
    assert (packed - plain).abs().max() <= tol * plain.abs().max()


def test_autograd_takes_the_plain_path():
    torch.manual_seed(0)
    lin = torch.nn.Linear(8, 4)
    x = torch.randn(5, 8)
    lin(x).square().sum().backward()
    want = lin.weight.grad.clone()
    lin.weight.grad = None
    with packed_linears(lin):
        lin(x).square().sum().backward()
    assert torch.allclose(lin.weight.grad, want)


def test_weight_changed_in_place_is_repacked():
    lin = torch.nn.Linear(16, 8, bias=False)
    x = torch.randn(4, 16)
    with torch.inference_mode(), packed_linears(lin):
        before = lin(x)
        with torch.no_grad():
            lin.weight.mul_(2.0)
        after = lin(x)
    assert torch.allclose(after, 2 * before, atol=1e-5)


def test_nested_contexts_keep_the_outer_packing():
    lin = torch.nn.Linear(8, 8)
    with packed_linears(lin):
        outer = lin.__dict__["forward"]
        with packed_linears(lin):
            assert lin.__dict__["forward"] is outer
        assert lin.__dict__["forward"] is outer
    assert "forward" not in lin.__dict__


def test_switch_off(monkeypatch):
    monkeypatch.setattr(cpu_linear, "ENABLED", False)
    lin = torch.nn.Linear(8, 8)
    with packed_linears(lin):
        assert "forward" not in lin.__dict__
