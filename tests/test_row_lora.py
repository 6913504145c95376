"""Per-row LoRA: rows of several adapters (and none) in one forward give what PEFT gives each alone."""

from __future__ import annotations

import pytest
import torch

from persona_ops.errors import InputError
from persona_ops.inference.row_lora import RowLora
from persona_ops.models.loading import LoadedModel, tiny_model
from persona_ops.models.pool import ModelPool
from persona_ops.models.refs import ModelRef


def _save_adapter(path, seed: int, **config) -> str:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    get_peft_model(tiny_model("llama", num_layers=2, hidden=32), LoraConfig(init_lora_weights=False, **config)
                   ).save_pretrained(path)
    return str(path)


@pytest.fixture
def served(tmp_path):
    """The base model and two attached adapters of different ranks and target modules."""
    base = ModelRef(name="tiny")
    pool = ModelPool()
    pool.add(base, LoadedModel(tiny_model("llama", num_layers=2, hidden=32), None, "tiny"))
    dirs = {"a": _save_adapter(tmp_path / "a", 1, r=4, target_modules=["q_proj", "v_proj"], lora_alpha=8),
            "b": _save_adapter(tmp_path / "b", 2, r=2, target_modules=["q_proj", "o_proj", "down_proj"])}
    refs = {name: base.resolved(d) for name, d in dirs.items()}
    models = {None: pool.get(base), **{name: pool.get(ref) for name, ref in refs.items()}}
    return models, {name: pool.adapter_name(ref) for name, ref in refs.items()}


@torch.no_grad()
def test_mixed_rows_in_one_forward_match_each_adapter_alone(served):
    models, names = served
    adapters = [None, "a", "b", "a", None, "b"]
    ids = torch.randint(0, 512, (len(adapters), 7), generator=torch.Generator().manual_seed(0))
    want = torch.cat([models[a].activate().model(input_ids=ids[i:i + 1]).logits for i, a in enumerate(adapters)])
    assert not torch.allclose(want[1], models[None].activate().model(input_ids=ids[1:2]).logits[0])

    lora = RowLora(models[None].model, names, rows=8)
    for row, a in enumerate(adapters):
        lora.assign(row, a)
    models[None].activate()  # the base weights: every adapter off
    with lora.applied(slice(0, len(adapters))):
        got = models[None].model(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)

    # rows selected by index (a prefill of new rows) and a row moved into a freed place
    lora.move(5, 0)
    lora.clear(5)
    with lora.applied(torch.tensor([0, 1, 5])):
        got = models[None].model(input_ids=ids[[5, 1, 4]]).logits
    torch.testing.assert_close(got, want[[5, 1, 4]], rtol=1e-4, atol=1e-5)


def test_unknown_and_unsupported_adapters_are_refused(served, tmp_path):
    models, names = served
    lora = RowLora(models[None].model, names, rows=2)
    with pytest.raises(KeyError, match="'c'"):
        lora.assign(0, "c")
    base = ModelRef(name="tiny2")
    pool = ModelPool()
    pool.add(base, LoadedModel(tiny_model("llama", num_layers=2, hidden=32), None, "tiny2"))
    ref = base.resolved(_save_adapter(tmp_path / "dora", 3, r=2, target_modules=["q_proj"], use_dora=True))
    model = pool.get(ref)
    with pytest.raises(InputError, match="'dora'.*q_proj.*plain LoRA"):
        RowLora(model.model, {"dora": pool.adapter_name(ref)}, rows=2)


def test_the_engine_follows_the_active_adapter_between_calls(served):
    """A kept decode step of the shared model is not replayed for another adapter's rows."""
    from persona_ops.inference.engine import generate_tokens
    from persona_ops.inference.sampling import SamplingParams

    models, _ = served
    greedy = SamplingParams(max_new_tokens=6, temperature=0.0)
    prompts = [[5, 9, 11], [17, 3, 99, 100]]
    calls = [generate_tokens(models[a], prompts, greedy, eos_ids=[]) for a in (None, "a", "b", None)]
    assert calls[0] == calls[3] and len({str(c) for c in calls[:3]}) == 3
    models["a"].model.__dict__.pop("_persona_ops_workspaces")
    assert generate_tokens(models["a"], prompts, greedy, eos_ids=[]) == calls[1]
