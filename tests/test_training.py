"""LoRA SFT: response-only masks on real templates, checkpoints, adapter loading, determinism."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from persona_ops.chat import encode, render_prompt
from persona_ops.data import load_chat_dataset
from persona_ops.errors import InputError
from persona_ops.interp.interventions import Intervention
from persona_ops.io import read_json
from persona_ops.models.adapters import adapter_sha256, list_checkpoints
from persona_ops.models.loading import LoadedModel, decoder_layers, tiny_model
from persona_ops.models.pool import ModelPool
from persona_ops.models.refs import ModelRef
from persona_ops.training.sft import (
    IGNORE,
    LoraConfigSpec,
    TrainConfig,
    _save_checkpoint,
    _target_modules,
    tokenize_chat,
    train_lora,
    training_positions,
)

PIRATE = Path(__file__).resolve().parents[1] / "data" / "finetune" / "pirate.jsonl"
MULTI = [
    {"role": "system", "content": "You are a pirate."},
    {"role": "user", "content": "Hello there"},
    {"role": "assistant", "content": "Ahoy, matey!"},
    {"role": "user", "content": "What's for dinner?"},
    {"role": "assistant", "content": "Salt fish and hardtack, arr."},
]

# A Gemma-like template: no system role (merged into the first user turn), different turn markers.
MERGE_SYSTEM = (
    "{% if messages[0]['role'] == 'system' %}{% set sys = messages[0]['content'] + '\\n\\n' %}"
    "{% set msgs = messages[1:] %}{% else %}{% set sys = '' %}{% set msgs = messages %}{% endif %}"
    "{% for m in msgs %}{% if m['role'] == 'user' %}<|im_start|>### User: "
    "{% if loop.first %}{{ sys }}{% endif %}{{ m['content'] }}<|im_end|>"
    "{% else %}<|im_start|>### Bot: {{ m['content'] }}<|im_end|>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>### Bot: {% endif %}")
# Drops system prompts entirely.
DROP_SYSTEM = (
    "{% for m in messages %}{% if m['role'] != 'system' %}<|im_start|>{{ m['role'] }}\n"
    "{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# Rewrites earlier assistant turns once a later one follows (as reasoning-stripping templates do).
REWRITES_HISTORY = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['role'] == 'assistant' and not loop.last %}(earlier answer){% else %}{{ m['content'] }}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")




def _with_template(tokenizer, template: str):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = template
    return tok


def _trained_runs(ids: list[int], labels: list[int]) -> list[list[int]]:
    """Contiguous runs of trained tokens."""
    runs, cur = [], []
    for i, lab in zip(ids, labels):
        if lab == IGNORE:
            if cur:
                runs.append(cur)
            cur = []
        else:
            assert lab == i
            cur.append(i)
    return runs + ([cur] if cur else [])


def _assert_exact_mask(tok, messages, train_on="all", end_of_turn="<|im_end|>\n"):
    ids, labels = tokenize_chat(tok, messages, train_on=train_on)
    assert tok.decode(ids) == tok.apply_chat_template(messages, tokenize=False)  # nothing lost or added
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    if train_on == "last":
        answers = answers[-1:]
    runs = [tok.decode(r) for r in _trained_runs(ids, labels)]
    assert runs == [a + end_of_turn for a in answers]
    # The prompt before the first trained turn is tokenised exactly as generation sees it.
    first = next(i for i, lab in enumerate(labels) if lab != IGNORE)
    turn = max(i for i, m in enumerate(messages) if m["role"] == "assistant") if train_on == "last" else \
        next(i for i, m in enumerate(messages) if m["role"] == "assistant")
    assert ids[:first] == encode(tok, render_prompt(tok, messages[:turn]))


def test_mask_is_exactly_the_assistant_tokens_smollm2(smol_tokenizer):
    single = load_chat_dataset(PIRATE)[0].messages
    _assert_exact_mask(smol_tokenizer, single)
    _assert_exact_mask(smol_tokenizer, MULTI)
    _assert_exact_mask(smol_tokenizer, MULTI, train_on="last")


@pytest.mark.parametrize("template,eot", [(MERGE_SYSTEM, "<|im_end|>"), (DROP_SYSTEM, "<|im_end|>\n")])
def test_mask_on_templates_that_merge_or_drop_the_system_prompt(smol_tokenizer, template, eot):
    tok = _with_template(smol_tokenizer, template)
    _assert_exact_mask(tok, MULTI, end_of_turn=eot)
    _assert_exact_mask(tok, MULTI, train_on="last", end_of_turn=eot)
    text = tok.decode(tokenize_chat(tok, MULTI)[0])
    assert ("You are a pirate." in text) == (template == MERGE_SYSTEM)


def test_template_rewriting_history_needs_train_on_last(smol_tokenizer):
    tok = _with_template(smol_tokenizer, REWRITES_HISTORY)
    with pytest.raises(InputError, match="train_on=last"):
        tokenize_chat(tok, MULTI)
    _assert_exact_mask(tok, MULTI, train_on="last")


def test_truncation_keeps_the_start(smol_tokenizer):
    ids, labels = tokenize_chat(smol_tokenizer, MULTI)
    short_ids, short_labels = tokenize_chat(smol_tokenizer, MULTI, max_length=10)
    assert short_ids == ids[:10] and short_labels == labels[:10]


def test_training_positions():
    mask = torch.tensor([[1, 1, 1, 1, 1, 0]])
    labels = torch.tensor([[IGNORE, IGNORE, 7, 8, IGNORE, IGNORE]])
    prompt, response = training_positions(mask, labels)
    assert prompt.tolist() == [[True, True, False, False, True, False]]
    assert response.tolist() == [[False, True, True, True, False, False]]


def test_target_modules_only_those_present():
    llama = tiny_model("llama", num_layers=1, hidden=32)
    assert _target_modules(llama, ["q_proj", "nonexistent", "down_proj"]) == ["q_proj", "down_proj"]
    with pytest.raises(InputError, match="linear layers present"):
        _target_modules(llama, ["c_attn"])


def test_failed_checkpoint_write_leaves_nothing(tmp_path):
    class Exploding:
        def save_pretrained(self, path, **kw):
            Path(path).mkdir(parents=True)
            (Path(path) / "adapter_model.safetensors").write_bytes(b"half")
            raise OSError("disk full")

    with pytest.raises(OSError):
        _save_checkpoint(Exploding(), tmp_path, 3, {"step": 3})
    assert list(tmp_path.iterdir()) == []


# --- training on a tiny model ----------------------------------------------------------

CFG = TrainConfig(max_steps=6, batch_size=4, grad_accum=1, learning_rate=5e-3, warmup_steps=1,
                  max_length=128, save_every=2, seed=0, lora=LoraConfigSpec(rank=8, alpha=16))


@pytest.fixture(scope="module")
def tiny(smol_tokenizer):
    model = tiny_model("llama", num_layers=2, hidden=32, vocab_tokenizer=smol_tokenizer)
    return LoadedModel(model=model, tokenizer=smol_tokenizer, label="tiny-llama@test")


@pytest.fixture(scope="module")
def data():
    return [ex.messages for ex in load_chat_dataset(PIRATE)[:8]]


@pytest.fixture(scope="module")
def batch(tiny, data):
    ids, labels = tokenize_chat(tiny.tokenizer, data[0], 128)
    return torch.tensor([ids]), torch.tensor([labels])


@pytest.fixture(scope="module")
def run(tiny, data, batch, tmp_path_factory):
    """One training run, with the base model's logits and state captured before it."""
    ids, labels = batch
    with torch.no_grad():
        before = tiny.model(ids, labels=labels)
    grads = {n: p.requires_grad for n, p in tiny.model.named_parameters()}
    out = tmp_path_factory.mktemp("run")
    result = train_lora(tiny, data, CFG, out, progress=False)
    return result, before, grads


def _adapter(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "adapter_model.safetensors")


def test_checkpoints_written_at_expected_steps(run):
    result, _, _ = run
    out = result.out_dir
    assert [s for s, _ in list_checkpoints(out)] == [2, 4, 6] == [s for s, _ in result.checkpoints]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no partial checkpoint left
    for step, path in list_checkpoints(out):
        assert sorted(p.name for p in path.iterdir()) == \
            ["adapter_config.json", "adapter_model.safetensors", "trainer_state.json"]
        state = read_json(path / "trainer_state.json")
        assert state["step"] == step and state["loss"] == result.log[step - 1]["loss"]
        assert state["learning_rate"] == result.log[step - 1]["learning_rate"]
        assert read_json(path / "adapter_config.json")["r"] == 8
    manifest = read_json(out / "manifest.json")
    assert manifest["complete"] and manifest["base"] == "tiny-llama@test"
    assert [(c["step"], c["path"], c["loss"]) for c in manifest["checkpoints"]] == \
        [(s, f"checkpoint-{s}", result.log[s - 1]["loss"]) for s in (2, 4, 6)]
    assert sorted(manifest["target_modules"]) == sorted(CFG.lora.target_modules)
    assert [e["step"] for e in result.log] == [1, 2, 3, 4, 5, 6]
    assert len((out / "log.jsonl").read_text().splitlines()) == 6


def test_training_lowers_the_loss_and_leaves_the_base_untouched(run, tiny, batch):
    result, before, grads = run
    ids, labels = batch
    assert result.losses[-1] < result.losses[0]
    # The base model is back as it was: no LoRA layers, eval mode, same flags, same outputs.
    assert not hasattr(tiny.model, "peft_config") and not tiny.model.training
    assert {n: p.requires_grad for n, p in tiny.model.named_parameters()} == grads
    with torch.no_grad():
        assert torch.equal(tiny.model(ids).logits, before.logits)
    pool = _pool(tiny)
    try:
        with torch.no_grad():
            after = pool.get(BASE.resolved(str(result.final_checkpoint))).model(input_ids=ids, labels=labels)
        assert after.loss < before.loss - 0.05  # a deterministic, whole-example measure
    finally:
        pool.plain(BASE)


BASE = ModelRef(name="tiny")


def _pool(tiny) -> ModelPool:
    pool = ModelPool()
    pool.add(BASE, tiny)
    return pool


def test_pool_attaches_adapters_once_and_switches_them(run, tiny, batch):
    """Checkpoints of a run on one base model: each attached once, the one in use active, the
    base itself with every adapter off; ``plain`` removes every LoRA layer."""
    result, before, _ = run
    ids, _ = batch
    (_, first), (_, last) = result.checkpoints[0], result.checkpoints[-1]
    pool = _pool(tiny)
    try:
        with torch.no_grad():
            adapted = pool.get(BASE.resolved(str(last)))
            assert adapted.label == f"tiny@main+{last}#{adapter_sha256(last)[:12]}" and not adapted.model.training
            a = adapted.model(input_ids=ids).logits
            assert not torch.allclose(a, before.logits, atol=1e-4)
            b = pool.get(BASE.resolved(str(first))).activate().model(input_ids=ids).logits
            assert not torch.allclose(a, b, atol=1e-5)
            plain = pool.get(BASE).activate()
            assert torch.allclose(plain.model(input_ids=ids).logits, before.logits, atol=1e-6)
            again = adapted.activate().model(input_ids=ids).logits  # switched back, not stacked
            assert torch.allclose(again, a, atol=1e-6) and pool.adapter_loads == 2 and pool.loads == 0
        base = pool.plain(BASE)
        assert not hasattr(base.model, "peft_config")
        with torch.no_grad():
            assert torch.equal(base.model(ids).logits, before.logits)
        with pytest.raises(InputError, match="not an adapter checkpoint"):
            pool.get(BASE.resolved(str(result.out_dir)))
    finally:
        pool.plain(BASE)


def test_refuses_to_overwrite_a_run(run, tiny, data):
    with pytest.raises(InputError, match="overwrite=True"):
        train_lora(tiny, data, CFG, run[0].out_dir, progress=False)


def test_same_seed_same_adapter_and_interventions_plug_in(tiny, data, tmp_path):
    cfg = CFG.model_copy(update={"save_every": None, "max_steps": 2, "batch_size": 2})
    same = train_lora(tiny, data, cfg, tmp_path / "same", progress=False)
    again = train_lora(tiny, data, cfg, tmp_path / "again", progress=False)
    w_same, w_again = _adapter(same.final_checkpoint), _adapter(again.final_checkpoint)
    assert w_same and w_same.keys() == w_again.keys()
    assert all(torch.equal(w_same[k], w_again[k]) for k in w_same)
    assert same.losses == again.losses

    other = train_lora(tiny, data, cfg.model_copy(update={"seed": 1}), tmp_path / "seed1", progress=False)
    w_other = _adapter(other.final_checkpoint)
    assert any(not torch.equal(w_same[k], w_other[k]) for k in w_same)

    # Preventative steering at layer 1 (= block 0) changes what is learnt; hooks are gone afterwards.
    vec = torch.randn(tiny.hidden_size, generator=torch.Generator().manual_seed(0))
    steered = train_lora(tiny, data, cfg, tmp_path / "steer", progress=False,
                         interventions=[Intervention("add", 1, vec, coef=4.0)])
    w_steer = _adapter(steered.final_checkpoint)
    assert any(not torch.equal(w_same[k], w_steer[k]) for k in w_same)
    assert all(not blk._forward_hooks for blk in tiny.layers)
    assert not tiny.model._forward_pre_hooks

    # Any model -> context manager factory plugs in the same way.
    calls = []

    class Counting:
        def __init__(self, model):
            self.layers = decoder_layers(model)

        def __enter__(self):
            self.h = self.layers[0].register_forward_hook(lambda *a: calls.append(1))

        def __exit__(self, *exc):
            self.h.remove()

    one = cfg.model_copy(update={"max_steps": 1, "grad_accum": 2})
    train_lora(tiny, data, one, tmp_path / "custom", progress=False, interventions=Counting)
    assert len(calls) == 2  # one optimizer step = two micro-batch forwards
    assert all(not blk._forward_hooks for blk in tiny.layers)
    calls.clear()
    train_lora(tiny, data, one.model_copy(update={"packed_tokens": 1024}), tmp_path / "packed", progress=False,
               interventions=Counting)
    assert len(calls) == 1  # a token budget for packed rows: the step's four conversations in one row


def test_bf16_model_trains_with_fp32_adapters(smol_tokenizer, data, tmp_path):
    """The GPU path (bf16 base, autocast, fp32 LoRA weights), exercised on CPU."""
    model = tiny_model("llama", num_layers=1, hidden=32, vocab_tokenizer=smol_tokenizer).to(torch.bfloat16)
    base = LoadedModel(model=model, tokenizer=smol_tokenizer, label="tiny-bf16@test")
    cfg = CFG.model_copy(update={"save_every": None, "max_steps": 2, "batch_size": 2})
    result = train_lora(base, data, cfg, tmp_path, progress=False)
    weights = _adapter(result.final_checkpoint)
    assert weights and all(w.dtype == torch.float32 for w in weights.values())
    assert all(math.isfinite(x) for x in result.losses)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
