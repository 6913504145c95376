"""CPU linear layers on packed oneDNN weights: same results, autograd untouched, repacking."""

import pytest
import torch

from persona_ops.kernels import cpu_linear
from persona_ops.kernels.cpu_linear import packed_linears
from persona_ops.models.loading import tiny_model

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
            assert n_linear > 0  # bf16 is packed only where the CPU has oneDNN's bf16 kernels
            assert len(_patched(model)) == (n_linear if dtype in cpu_linear.packed_dtypes() else 0)
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


def test_lora_injected_while_packed_matches_unpacked():
    """serve-model packs once, then switches LoRA adapters in place: PEFT wraps the packed layers."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = tiny_model("llama", num_layers=2, hidden=64)
    ids = torch.randint(4, 500, (2, 11))
    with torch.inference_mode():
        base_plain = model(input_ids=ids).logits
    with packed_linears(model):
        peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0.0, 0.5)  # LoRA starts as a no-op; make it change the output
        with torch.inference_mode():
            packed = peft_model(input_ids=ids).logits
    with torch.inference_mode():
        plain = peft_model(input_ids=ids).logits  # the same adapter, plain F.linear
    assert not torch.allclose(plain, base_plain, atol=1e-3)  # the adapter matters
    assert torch.allclose(packed, plain, atol=1e-4)
    base = peft_model.unload()
    with packed_linears(base):  # inject and unload again while packed, as an adapter switch does
        get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"])).unload()
        assert _patched(base)
        with torch.inference_mode():
            assert torch.allclose(base(input_ids=ids).logits, base_plain, atol=1e-4)
