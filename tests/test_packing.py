"""Padding-free packing: one row per micro-batch, attention and labels kept inside each conversation,
the same training as the padded collator, and training-time steering on packed batches."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from persona_ops.data import load_chat_dataset
from persona_ops.interp.interventions import Intervention
from persona_ops.models.loading import LoadedModel, decoder_layers, tiny_model
from persona_ops.training.sft import (
    IGNORE,
    LoraConfigSpec,
    TrainConfig,
    micro_batch_size,
    pack_examples,
    packed_attention,
    steering_during_training,
    tokenize_chat,
    train_lora,
    training_positions,
    varlen_attention_usable,
)

PIRATE = Path(__file__).resolve().parents[1] / "data" / "finetune" / "pirate.jsonl"


def _random_examples(lengths: list[int], vocab: int, seed: int = 0) -> list[dict]:
    """Conversations of random tokens; the second half of each is trained."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(0, vocab, (n,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [IGNORE] * (n // 2) + ids[n // 2:]})
    return out


def _model_inputs(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k != "labels"}


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_logits_equal_per_sequence_logits(arch, attention):
    """transformers (no attention_mask, no cache: the batch says use_cache=False) reads restarting
    position_ids as separate sequences and masks attention block-diagonally: each conversation's
    logits are as if it ran alone."""
    model = tiny_model(arch, num_layers=2, hidden=32)
    model.set_attn_implementation(attention)
    examples = _random_examples([7, 12, 5], model.config.vocab_size)
    batch = pack_examples(examples)
    with torch.no_grad():
        packed = model(**_model_inputs(batch)).logits[0]
        alone = torch.cat([model(torch.tensor([e["input_ids"]])).logits[0] for e in examples])
        # the same row without restarting positions: later conversations see the earlier ones
        one_sequence = model(batch["input_ids"], use_cache=False).logits[0]
    assert packed.shape == alone.shape
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(one_sequence[7:], alone[7:], atol=1e-3)


def test_no_label_crosses_a_boundary():
    examples = [{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}, {"input_ids": [8, 9], "labels": [8, 9]},
                {"input_ids": [10, 11, 12, 13], "labels": [IGNORE, IGNORE, 12, 13]}]
    batch = pack_examples(examples)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 10, 11, 12, 13]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3]]
    # a conversation's first token is never a target: 7 does not learn to predict 8, nor 9 to predict 10
    assert batch["labels"].tolist() == [[IGNORE, 6, 7, IGNORE, 9, IGNORE, IGNORE, 12, 13]]
    assert batch["cu_seq_lens_q"].tolist() == [0, 3, 5, 9] and batch["max_length_q"] == 4
    # the targets counted for the loss (HF shifts labels by one) are those of the padded batch
    padded = sum(sum(x != IGNORE for x in e["labels"][1:]) for e in examples)
    assert int((batch["labels"][:, 1:] != IGNORE).sum()) == padded == 5


def test_packed_loss_is_the_mean_over_every_conversation_token():
    model = tiny_model("llama", num_layers=2, hidden=32)
    examples = _random_examples([9, 6, 11], model.config.vocab_size, seed=1)
    with torch.no_grad():
        packed = model(**pack_examples(examples)).loss
        sums = [model(torch.tensor([e["input_ids"]]), labels=torch.tensor([e["labels"]]),
                      num_items_in_batch=1).loss for e in examples]
    counts = [sum(x != IGNORE for x in e["labels"][1:]) for e in examples]
    torch.testing.assert_close(packed, torch.stack(sums).sum() / sum(counts), atol=1e-6, rtol=1e-5)


def test_micro_batch_size_divides_the_step_within_the_token_budget():
    cfg = TrainConfig(batch_size=2, grad_accum=8)
    assert micro_batch_size(cfg, longest=700, varlen=True) == 8  # 16 x 700 > PACKED_TOKENS = 8192
    assert micro_batch_size(cfg, longest=500, varlen=True) == 16
    assert micro_batch_size(cfg, longest=3000, varlen=True) == 2
    assert micro_batch_size(cfg, longest=9000, varlen=True) == 1  # one conversation at least
    assert micro_batch_size(cfg, longest=500, varlen=False) == 2  # whole-row attention: rows of batch_size
    assert micro_batch_size(cfg.model_copy(update={"packed_tokens": 2000}), longest=500, varlen=False) == 4
    assert micro_batch_size(TrainConfig(batch_size=3, grad_accum=2, packed_tokens=1000), 300, varlen=True) == 3
    assert micro_batch_size(cfg.model_copy(update={"packing": False}), longest=10, varlen=True) == 2


# --- training ------------------------------------------------------------------------

BASE_CFG = TrainConfig(max_steps=2, batch_size=2, grad_accum=2, learning_rate=5e-3, warmup_steps=0,
                       max_length=128, seed=0, lora=LoraConfigSpec(rank=4, alpha=8), packing=False)


@pytest.fixture(scope="module")
def tiny(smol_tokenizer):
    model = tiny_model("llama", num_layers=2, hidden=32, vocab_tokenizer=smol_tokenizer)
    return LoadedModel(model=model, tokenizer=smol_tokenizer, label="tiny-llama@test")


@pytest.fixture(scope="module")
def data():
    return [ex.messages for ex in load_chat_dataset(PIRATE)[:8]]


def test_packed_training_equals_padded_training(tiny, data, tmp_path):
    """Same conversations in each step, same token-level loss normalisation: padded micro-batches of
    2 x 2 steps, packed rows of 4 (one forward a step) and packed rows of 2 give the same run."""
    longest = max(len(tokenize_chat(tiny.tokenizer, m, 128)[0]) for m in data)
    padded = train_lora(tiny, data, BASE_CFG, tmp_path / "padded", progress=False)
    runs = {}
    for name, budget in (("rows_of_4", 8192), ("rows_of_2", 2 * longest)):
        cfg = BASE_CFG.model_copy(update={"packing": True, "packed_tokens": budget})
        runs[name] = train_lora(tiny, data, cfg, tmp_path / name, progress=False)
    assert padded.extra["micro_batch"] == 2 and padded.extra["grad_accum"] == 2
    assert (runs["rows_of_4"].extra["micro_batch"], runs["rows_of_4"].extra["grad_accum"]) == (4, 1)
    assert (runs["rows_of_2"].extra["micro_batch"], runs["rows_of_2"].extra["grad_accum"]) == (2, 2)
    w_padded = load_file(padded.final_checkpoint / "adapter_model.safetensors")
    lora_b = [k for k in w_padded if "lora_B" in k]
    assert lora_b and all(w_padded[k].abs().max() > 1e-4 for k in lora_b)  # the adapter was trained
    for run in runs.values():
        assert len(run.losses) == len(padded.losses) == 2
        torch.testing.assert_close(torch.tensor(run.losses), torch.tensor(padded.losses), atol=1e-5, rtol=1e-5)
        w = load_file(run.final_checkpoint / "adapter_model.safetensors")
        assert w.keys() == w_padded.keys()
        for k in w:
            torch.testing.assert_close(w[k], w_padded[k], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("positions", ["response", "prompt"])
def test_steering_positions_in_a_packed_batch(tiny, data, positions):
    """The positions an intervention edits in a packed row are, conversation by conversation, those
    it edits on each conversation alone (no attention_mask in the batch)."""
    model = tiny.model
    tokenised = [tokenize_chat(tiny.tokenizer, m, 128) for m in data[:3]]
    batch = pack_examples([{"input_ids": i, "labels": lab} for i, lab in tokenised])
    assert "attention_mask" not in batch
    expected = torch.cat([training_positions(torch.ones(1, len(i)), torch.tensor([lab]))[
        0 if positions == "prompt" else 1][0] for i, lab in tokenised])
    assert expected.any() and not expected.all()

    block0 = decoder_layers(model)[0]
    seen = []

    def block0_output():
        handle = block0.register_forward_hook(
            lambda module, args, output: seen.append((output[0] if isinstance(output, tuple) else output).clone()))
        try:
            model(**batch)
        finally:
            handle.remove()

    vec = torch.ones(model.config.hidden_size)
    attach = steering_during_training([Intervention("add", 1, vec, coef=2.0, positions=positions)])
    with torch.no_grad():
        block0_output()
        with attach(model):
            block0_output()  # its hook comes after the steerer's, so it sees the edited output
    edited = (seen[1] - seen[0])[0].abs().amax(-1) > 1e-6
    assert edited.tolist() == expected.tolist()
    torch.testing.assert_close((seen[1] - seen[0])[0][expected], torch.full((int(expected.sum()), vec.numel()), 2.0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the varlen flash-attention kernel needs a CUDA GPU")
def test_varlen_attention_on_gpu_equals_per_sequence_sdpa():
    """On a GPU, packed training swaps SDPA for the varlen kernel: same logits as each conversation
    alone, gradients flow, and the model's implementation is restored afterwards."""
    torch.manual_seed(0)
    model = tiny_model("qwen3", num_layers=2, hidden=256).to("cuda", torch.bfloat16)
    model.set_attn_implementation("sdpa")
    examples = _random_examples([200, 37, 129], model.config.vocab_size)
    batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in pack_examples(examples).items()}
    with torch.no_grad():
        alone = torch.cat([model(torch.tensor([e["input_ids"]], device="cuda")).logits[0] for e in examples])
    assert varlen_attention_usable(model, TrainConfig())
    with packed_attention(model):
        assert model.config._attn_implementation == "packed_varlen"
        out = model(**batch)
        out.loss.backward()
    assert model.config._attn_implementation == "sdpa"
    torch.testing.assert_close(out.logits[0].float(), alone.float(), atol=2e-2, rtol=2e-2)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
