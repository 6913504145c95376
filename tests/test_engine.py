"""The generation engine against HF ``generate`` on tiny models; seeds, EOS, steering semantics."""

from __future__ import annotations

import pytest
import torch

from persona_ops.chat import chat_messages, render_prompt
from persona_ops.inference.engine import generate_text, generate_tokens
from persona_ops.inference.sampling import SamplingParams
from persona_ops.interp.interventions import Intervention
from persona_ops.models.loading import LoadedModel, tiny_model

PROMPTS = [[5, 9, 11, 40], [17, 3, 99, 100, 101, 7, 250, 31], [8], [300, 301]]
GREEDY = SamplingParams(max_new_tokens=7, temperature=0.0)




def _loaded(arch: str, seed: int = 0) -> LoadedModel:
    m = tiny_model(arch, num_layers=3, hidden=64, seed=seed)
    m.generation_config.eos_token_id = None
    return LoadedModel(model=m, tokenizer=None, label=f"tiny-{arch}")


@pytest.fixture(scope="module", params=["llama", "qwen3", "olmo2"])
def loaded(request) -> LoadedModel:
    return _loaded(request.param)


def _hf_generate(loaded: LoadedModel, prompts, new: int, hook=None, layer: int = 2) -> list[list[int]]:
    width = max(len(p) for p in prompts)
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, p in enumerate(prompts):
        ids[r, width - len(p):] = torch.tensor(p)
        mask[r, width - len(p):] = 1
    handle = loaded.layers[layer - 1].register_forward_hook(hook) if hook else None
    try:
        with torch.no_grad():
            out = loaded.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False,
                                        pad_token_id=0)
    finally:
        if handle:
            handle.remove()
    return out[:, width:].tolist()


def test_greedy_equals_hf_generate(loaded):
    assert generate_tokens(loaded, PROMPTS, GREEDY, eos_ids=[]) == _hf_generate(loaded, PROMPTS, 7)
    # several batches give the same rows
    assert generate_tokens(loaded, PROMPTS, GREEDY, eos_ids=[], batch_size=3) == _hf_generate(loaded, PROMPTS, 7)
    # prefill in row groups (here: every prompt alone) gives the same rows
    assert generate_tokens(loaded, PROMPTS, GREEDY, eos_ids=[], prefill_tokens=1) == _hf_generate(loaded, PROMPTS, 7)


def test_prefill_groups_bound_the_padded_size():
    from persona_ops.inference.engine import prefill_groups

    lengths = [2, 3, 3, 5, 9, 20]
    groups = prefill_groups(lengths, 10)
    assert groups == [(0, 3), (3, 4), (4, 5), (5, 6)]
    assert [r for g in groups for r in range(*g)] == list(range(len(lengths)))
    assert all((r1 - r0) * lengths[r1 - 1] <= 10 or r1 - r0 == 1 for r0, r1 in groups)


def test_per_row_coefficients_across_prefill_groups(loaded):
    """One batch with a coefficient per row equals each row steered alone, however prefill is grouped."""
    v = torch.randn(64) * 3
    coefs = [0.0, 1.0, -2.0, 0.5]
    batch = generate_tokens(loaded, PROMPTS, GREEDY, [Intervention("add", 2, v, coef=torch.tensor(coefs),
                                                                   positions="response")],
                            eos_ids=[], prefill_tokens=6)
    alone = [generate_tokens(loaded, [p], GREEDY, [Intervention("add", 2, v, coef=c, positions="response")],
                             eos_ids=[])[0] for p, c in zip(PROMPTS, coefs)]
    assert batch == alone


@pytest.mark.parametrize("positions", ["response", "prompt", "all"])
def test_steering_matches_persona_vectors_hooks(loaded, positions):
    """response = persona_vectors' t[:, -1] on every forward; prompt = every position in prefill only.
    (persona_vectors also edits padding; padding is masked out of attention, so outputs agree.)"""
    v = torch.randn(64) * 3

    def pv_hook(module, args, output):
        h = output[0] if isinstance(output, tuple) else output
        h = h.clone()
        if positions == "response":
            h[:, -1] += v
        elif h.shape[1] > 1 or positions == "all":
            h += v
        return h

    ours = generate_tokens(loaded, PROMPTS, GREEDY, [Intervention("add", 2, v, coef=1.0, positions=positions)],
                           eos_ids=[])
    assert ours == _hf_generate(loaded, PROMPTS, 7, hook=pv_hook)
    assert ours != generate_tokens(loaded, PROMPTS, GREEDY, eos_ids=[])


def test_coef_zero_equals_unsteered_under_sampling(loaded):
    sp = SamplingParams(max_new_tokens=9, temperature=1.0, top_p=0.9, seed=11)
    plain = generate_tokens(loaded, PROMPTS, sp, eos_ids=[])
    zero = generate_tokens(loaded, PROMPTS, sp, [Intervention("add", 2, torch.randn(64) * 50, coef=0.0,
                                                              positions="all")], eos_ids=[])
    assert zero == plain


def test_sampling_is_reproducible_under_a_seed():
    loaded = _loaded("llama")
    sp = SamplingParams(max_new_tokens=12, temperature=1.0, seed=3)
    a = generate_tokens(loaded, PROMPTS, sp, eos_ids=[])
    assert a == generate_tokens(loaded, PROMPTS, sp, eos_ids=[])
    assert a != generate_tokens(loaded, PROMPTS, SamplingParams(max_new_tokens=12, temperature=1.0, seed=4),
                                eos_ids=[])


def _without_kept_workspaces(loaded: LoadedModel, *args, **kwargs) -> list[list[int]]:
    loaded.model.__dict__.pop("_persona_ops_workspaces", None)
    return generate_tokens(loaded, *args, **kwargs)


def test_a_call_of_a_kept_shape_uses_its_own_values(loaded):
    """The second call of one shape reuses the first one's workspace (cache, inputs, pinned
    steering) and computes what a call without any kept workspace computes."""
    w = torch.randn(64)

    def steer(v, coef):
        return [Intervention("add", 2, v, coef=coef, positions="response"), Intervention("ablate", 3, w, coef=0.5)]

    v1, v2 = torch.randn(64) * 0.01, torch.randn(64) * 0.01  # a tiny model's residual norm is ~0.2
    generate_tokens(loaded, PROMPTS, GREEDY, steer(v1, torch.tensor([1.0, 0.0, 2.0, -1.0])), eos_ids=[])
    kept = dict(loaded.model._persona_ops_workspaces)
    longer = [p + [1, 2, 3] for p in PROMPTS]  # a longer prompt in the same cache length
    second = generate_tokens(loaded, longer, GREEDY, steer(v2, torch.tensor([0.5, 1.0, 1.0, 3.0])), eos_ids=[])
    assert loaded.model._persona_ops_workspaces == kept  # the same workspace objects
    third = generate_tokens(loaded, longer, GREEDY, steer(v2, 2.0), eos_ids=[])  # a scalar coefficient
    assert second == _without_kept_workspaces(loaded, longer, GREEDY, steer(v2, torch.tensor([0.5, 1.0, 1.0, 3.0])),
                                              eos_ids=[])
    assert third == _without_kept_workspaces(loaded, longer, GREEDY, steer(v2, 2.0), eos_ids=[])
    assert second != third


def test_kept_workspaces_follow_the_weights_and_stay_bounded(monkeypatch):
    from persona_ops.inference import engine

    loaded = _loaded("llama")
    plain = generate_tokens(loaded, PROMPTS, GREEDY, eos_ids=[])
    for b in (1, 2, 3):  # three shapes: a model keeps the last one only
        generate_tokens(loaded, PROMPTS[:b], GREEDY, eos_ids=[])
        (ws,) = loaded.model._persona_ops_workspaces.values()
        assert ws.store.batch == b
    monkeypatch.setattr(engine, "_keep_bytes", lambda dev: ws.nbytes() - 1)
    generate_tokens(loaded, PROMPTS, GREEDY, eos_ids=[])
    assert loaded.model._persona_ops_workspaces == {}  # above the budget: not kept after the call
    monkeypatch.undo()
    with torch.no_grad():  # weights replaced by new tensors: nothing captured before may be replayed
        for p in loaded.model.parameters():
            p.data = p.data * 1.5
    changed = generate_tokens(loaded, PROMPTS, GREEDY, eos_ids=[])
    assert changed != plain
    assert changed == _without_kept_workspaces(loaded, PROMPTS, GREEDY, eos_ids=[])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_a_captured_decode_step_is_replayed_by_the_next_call_of_its_shape():
    from persona_ops.inference.engine import STATS

    loaded = LoadedModel(tiny_model("llama", num_layers=3, hidden=64, seed=0).cuda(), None, "tiny-llama")
    def steer_with(coefs):
        return [Intervention("add", 2, torch.randn(64) * 0.02, coef=torch.tensor(coefs), positions="response")]

    steer = steer_with([1.0, 0.0, 2.0, -1.0])
    first = generate_tokens(loaded, PROMPTS, GREEDY, steer, eos_ids=[])
    captures = STATS["graph_captures"]
    steer2 = steer_with([2.0, 1.0, 0.0, 1.0])
    again = generate_tokens(loaded, PROMPTS, GREEDY, steer2, eos_ids=[])
    assert STATS["graph_captures"] == captures
    assert again == _without_kept_workspaces(loaded, PROMPTS, GREEDY, steer2, eos_ids=[])
    assert again != first and STATS["graph_captures"] == captures + 1


def test_compiled_prefill_equals_hf_generate(caplog):
    from torch._dynamo.utils import counters

    lm = _loaded("llama")  # the CPU compiles the prefill's blocks only (decode steps are not captured)
    graphs = counters["stats"]["unique_graphs"]
    with caplog.at_level("WARNING", logger="persona_ops.kernels.compile"):
        assert generate_tokens(lm, PROMPTS, GREEDY, eos_ids=[], compile_blocks=True) == _hf_generate(lm, PROMPTS, 7)
    assert counters["stats"]["unique_graphs"] > graphs and "failed" not in caplog.text


def test_a_failed_compile_falls_back_to_eager_blocks(monkeypatch, caplog):
    from persona_ops.kernels import compile as compile_module

    def failing(fn, **kwargs):  # what a compiler error raises (a real one cannot be provoked at will)
        def run(*args, **kw):
            raise torch._dynamo.exc.BackendCompilerFailed(lambda *a: None, RuntimeError("no kernel"), None)
        return run

    lm = _loaded("llama")
    eager = generate_tokens(lm, PROMPTS, GREEDY, eos_ids=[], compile_blocks=False)
    monkeypatch.setattr(compile_module.torch, "compile", failing)
    monkeypatch.setattr(compile_module, "_FAILED", set())
    with caplog.at_level("WARNING", logger="persona_ops.kernels.compile"):
        assert generate_tokens(lm, PROMPTS, GREEDY, eos_ids=[], compile_blocks=True) == eager
        assert caplog.text.count("failed") == 1  # one warning for the block class
        assert generate_tokens(lm, PROMPTS, GREEDY, eos_ids=[], compile_blocks=True) == eager
    assert caplog.text.count("failed") == 1  # not compiled again


def test_eos_stops_a_row_and_min_new_tokens_holds_it_back():
    loaded = _loaded("llama", seed=1)
    free = generate_tokens(loaded, PROMPTS, GREEDY, eos_ids=[])
    eos = free[0][2]
    stopped = generate_tokens(loaded, PROMPTS, GREEDY, eos_ids=[eos])
    for row, full in zip(stopped, free):  # each row is cut just after its first EOS, others run on
        cut = full.index(eos) + 1 if eos in full else len(full)
        assert row == full[:cut]
    assert len(stopped[0]) <= 3 and stopped[0][-1] == eos
    held = generate_tokens(loaded, PROMPTS, GREEDY, eos_ids=[eos], min_new_tokens=7)
    assert all(len(r) == 7 and eos not in r for r in held)


def test_generate_text_with_a_real_tokenizer(tiny_loaded):
    tok = tiny_loaded.tokenizer
    prompts = [render_prompt(tok, chat_messages(tok, None, q)) for q in ("Hi", "Tell me about the sea")]
    out = generate_text(tiny_loaded, prompts, SamplingParams(max_new_tokens=5, temperature=1.0, seed=0))
    assert len(out) == 2 and all(isinstance(s, str) for s in out)


GEMMA_PROMPTS = [[5, 9, 11, 40, 3, 2, 77], [17, 3, 99, 100, 101, 7, 250, 31, 12, 13, 14], [8], [300, 301]]
GEMMA_GREEDY = SamplingParams(max_new_tokens=10, temperature=0.0)


def _gemma2(**overrides) -> LoadedModel:
    """A tiny random Gemma-2: a 4-token window on layers 0 and 2, attention logits capped at 2.
    q/k weights are scaled up so scores are large enough for the cap (and the window) to matter."""
    from transformers import AutoModelForCausalLM, Gemma2Config

    torch.manual_seed(0)
    cfg = dict(num_hidden_layers=4, hidden_size=64, intermediate_size=128, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, vocab_size=512, max_position_embeddings=256,
               sliding_window=4, attn_logit_softcapping=2.0, final_logit_softcapping=3.0,
               query_pre_attn_scalar=16)
    # eager: HF's SDPA path ignores the softcap in some transformers versions
    m = AutoModelForCausalLM.from_config(Gemma2Config(**{**cfg, **overrides}), attn_implementation="eager").eval()
    with torch.no_grad():
        for layer in m.model.layers:
            layer.self_attn.q_proj.weight.mul_(8)
            layer.self_attn.k_proj.weight.mul_(8)
    m.generation_config.eos_token_id = None
    return LoadedModel(model=m, tokenizer=None, label="tiny-gemma2")


@pytest.fixture(scope="module")
def gemma2() -> LoadedModel:
    return _gemma2()


def test_gemma2_greedy_equals_hf_generate(gemma2):
    """Softcapped attention and sliding windows over left-padded prompts longer than the window."""
    want = _hf_generate(gemma2, GEMMA_PROMPTS, 10)
    # the window and the cap change these outputs, so ignoring either fails the comparison
    assert want != _hf_generate(_gemma2(sliding_window=4096), GEMMA_PROMPTS, 10)
    assert want != _hf_generate(_gemma2(attn_logit_softcapping=None), GEMMA_PROMPTS, 10)
    assert generate_tokens(gemma2, GEMMA_PROMPTS, GEMMA_GREEDY, eos_ids=[]) == want
    assert generate_tokens(gemma2, GEMMA_PROMPTS, GEMMA_GREEDY, eos_ids=[], batch_size=3) == want
    assert generate_tokens(gemma2, GEMMA_PROMPTS, GEMMA_GREEDY, eos_ids=[], prefill_tokens=1) == want


def test_gemma2_window_without_softcap_equals_hf_generate():
    """Sliding windows alone take the SDPA prefill with a windowed mask."""
    loaded = _gemma2(attn_logit_softcapping=None)
    want = _hf_generate(loaded, GEMMA_PROMPTS, 10)
    assert want != _hf_generate(_gemma2(attn_logit_softcapping=None, sliding_window=4096), GEMMA_PROMPTS, 10)
    assert generate_tokens(loaded, GEMMA_PROMPTS, GEMMA_GREEDY, eos_ids=[]) == want


def test_gemma2_steering(gemma2):
    """Steering the last position equals the same hook on HF ``generate``; coef 0 equals unsteered."""
    v = torch.randn(64, generator=torch.Generator().manual_seed(0)) * 3

    def pv_hook(module, args, output):
        h = output[0] if isinstance(output, tuple) else output
        h = h.clone()
        h[:, -1] += v
        return h

    steered = generate_tokens(gemma2, GEMMA_PROMPTS, GEMMA_GREEDY, [Intervention("add", 2, v, positions="response")],
                              eos_ids=[])
    assert steered == _hf_generate(gemma2, GEMMA_PROMPTS, 10, hook=pv_hook)
    plain = generate_tokens(gemma2, GEMMA_PROMPTS, GEMMA_GREEDY, eos_ids=[])
    assert steered != plain
    zero = generate_tokens(gemma2, GEMMA_PROMPTS, GEMMA_GREEDY, [Intervention("add", 2, v * 50, coef=0.0,
                                                                          positions="all")], eos_ids=[])
    assert zero == plain


def test_unsupported_attention_feature_is_an_input_error(monkeypatch):
    from persona_ops.errors import InputError
    from persona_ops.inference import engine

    module = _loaded("llama").model.model.layers[0].self_attn
    monkeypatch.setattr(engine, "_ACTIVE", engine.KVStore(1, 64))
    q = torch.zeros(1, 4, 2, 16)
    with pytest.raises(InputError, match="attention sinks"):
        engine._attention(module, q, q[:, :2], q[:, :2], None, s_aux=torch.zeros(4))
