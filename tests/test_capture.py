"""The capture engine against a per-sample ``output_hidden_states`` reference on tiny models."""

from __future__ import annotations

import random

import pytest
import torch

from persona_ops.errors import InputError
from persona_ops.interp import capture as activations
from persona_ops.interp.capture import AGGREGATES, capture_tokens, load_token_rows, plan_batches
from persona_ops.models.loading import LoadedModel, tiny_model

NUM_LAYERS = 4




@pytest.fixture(scope="module", params=["llama", "qwen3", "olmo2"])
def model(request) -> LoadedModel:
    m = tiny_model(request.param, num_layers=NUM_LAYERS, hidden=64)
    return LoadedModel(model=m, tokenizer=None, label=f"tiny-{request.param}")


def _samples(n: int, seed: int = 0) -> tuple[list[list[int]], list[list[int]]]:
    rng = random.Random(seed)
    prompts = [[rng.randrange(4, 512) for _ in range(rng.randint(1, 12))] for _ in range(n)]
    answers = [[rng.randrange(4, 512) for _ in range(rng.randint(0, 15))] for _ in range(n)]
    answers[0] = [7, 8, 9]
    return prompts, answers


_REFS: dict[str, list] = {}  # per-sample references, shared by the layer-subset cases


@torch.no_grad()
def _reference(model: LoadedModel, p: list[int], a: list[int]) -> dict[str, torch.Tensor]:
    hs = model.model(torch.tensor([p + a]), output_hidden_states=True).hidden_states
    P = len(p)
    zero = torch.zeros(hs[0].shape[-1])
    return {"prompt_avg": torch.stack([h[0, :P].mean(0) for h in hs]),
            "response_avg": torch.stack([h[0, P:].mean(0) if a else zero for h in hs]),
            "prompt_last": torch.stack([h[0, P - 1] for h in hs]),
            "all": torch.stack([h[0] for h in hs])}


@pytest.mark.parametrize("layers", [[0, 2, NUM_LAYERS], [1, 2]], ids=["subset+final-norm", "early-stop"])
def test_capture_equals_per_sample_reference(model, layers, tmp_path, monkeypatch):
    monkeypatch.setattr(activations, "_PENDING_BYTES", 1)  # copy to the host after every batch
    prompts, answers = _samples(9)
    res = capture_tokens(model, prompts, answers, layers=layers, aggregates=AGGREGATES + ("none",),
                         token_budget=40, shard_dir=tmp_path, shard_tokens=30, progress=False)
    assert res.layers == layers and len(res.shards) > 1
    assert res.num_tokens == sum(len(p) + len(a) for p, a in zip(prompts, answers))
    if model.label not in _REFS:
        _REFS[model.label] = [_reference(model, p, a) for p, a in zip(prompts, answers)]
    refs = _REFS[model.label]
    for name in AGGREGATES:
        assert res.means[name].shape == (9, len(layers), 64) and res.means[name].dtype == torch.float32
        want = torch.stack([r[name][layers] for r in refs])
        torch.testing.assert_close(res.means[name], want, atol=1e-5, rtol=1e-4)
    for j, L in enumerate(layers):  # per-token rows from the shards, every real token once
        rows = load_token_rows(res.shards, L)
        for i, (p, a) in enumerate(zip(prompts, answers)):
            sel = rows["sample"] == i
            order = rows["position"][sel].argsort()
            got = rows["rows"][sel][order]
            torch.testing.assert_close(got, refs[i]["all"][L], atol=1e-5, rtol=1e-4)
            assert rows["is_response"][sel][order].tolist() == [0] * len(p) + [1] * len(a)


def test_forward_stops_after_last_requested_layer(model):
    calls = []
    handles = [blk.register_forward_hook(lambda m, a, o, i=i: calls.append(i)) for i, blk in enumerate(model.layers)]
    try:
        capture_tokens(model, [[5, 6, 7]], [[8, 9]], layers=[2], progress=False)
    finally:
        for h in handles:
            h.remove()
    assert calls == [0, 1]  # blocks 0 and 1 give hidden_states[2]; blocks 2, 3 never run


def test_bf16_model_captures_in_fp32():
    m = tiny_model("llama", num_layers=2, hidden=64).to(torch.bfloat16)
    loaded = LoadedModel(model=m, tokenizer=None, label="tiny-bf16")
    prompts, answers = _samples(4, seed=1)
    res = capture_tokens(loaded, prompts, answers, layers=[1, 2], token_budget=64, progress=False)
    assert res.means["response_avg"].dtype == torch.float32
    for i, (p, a) in enumerate(zip(prompts, answers)):
        with torch.no_grad():
            hs = m(torch.tensor([p + a]), output_hidden_states=True).hidden_states
        want = hs[1][0, :len(p)].float().mean(0)
        torch.testing.assert_close(res.means["prompt_avg"][i, 0], want, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("budget", [1, 16, 50, 1000])
def test_token_budget_batching_covers_every_sample_once(budget):
    rng = random.Random(budget)
    lengths = [rng.randint(1, 40) for _ in range(97)]
    batches = plan_batches(lengths, budget, max_batch=8)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(97))
    for b in batches:
        width = max(lengths[i] for i in b)
        assert len(b) <= 8 and (len(b) == 1 or len(b) * width <= budget)
        assert lengths[b[0]] == width  # first row is the longest: no extra padding on the right
    widths = [lengths[b[0]] for b in batches]
    assert widths == sorted(widths, reverse=True)


def test_bad_arguments_are_input_errors(model):
    with pytest.raises(InputError):
        capture_tokens(model, [[1]], [[2]], layers=[NUM_LAYERS + 1], progress=False)
    with pytest.raises(InputError):
        capture_tokens(model, [[1]], [[2]], aggregates=("none",), progress=False)
    with pytest.raises(InputError):
        capture_tokens(model, [[]], [[2]], progress=False)


def _batch_shapes(model: LoadedModel, run) -> list[tuple[int, int]]:
    shapes = []
    handle = model.layers[0].register_forward_pre_hook(lambda m, a, k: shapes.append(tuple(
        (a[0] if a else k["hidden_states"]).shape[:2])), with_kwargs=True)
    try:
        run()
    finally:
        handle.remove()
    return shapes


def test_cpu_workers_give_the_single_thread_result_and_restore_threads(model):
    prompts, answers = _samples(11, seed=3)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = capture_tokens(model, prompts, answers, layers=[1, 3], token_budget=30, progress=False)
        torch.set_num_threads(3)
        assert activations._cpu_workers(torch.device("cpu")) == (3, 1)
        several = capture_tokens(model, prompts, answers, layers=[1, 3], token_budget=30, progress=False)
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(threads)
    for name in AGGREGATES:
        torch.testing.assert_close(several.means[name], one.means[name], atol=1e-6, rtol=1e-5)


def test_cpu_batches_stay_within_the_cpu_token_budget(model, monkeypatch):
    monkeypatch.setattr(activations, "CPU_TOKEN_BUDGET", 24)
    prompts, answers = _samples(13, seed=4)
    shapes = _batch_shapes(model, lambda: capture_tokens(model, prompts, answers, layers=[2], token_budget=4096,
                                                         progress=False))
    assert sum(b for b, _ in shapes) == 13 and len(shapes) > 1
    assert all(b == 1 or b * t <= 24 for b, t in shapes)


def test_only_the_blocks_that_run_are_packed(model, monkeypatch):
    from persona_ops.kernels import cpu_linear

    if not cpu_linear.available():
        pytest.skip("no oneDNN in this torch build")
    monkeypatch.setattr(activations, "PACK_LINEARS", True)
    seen = {}

    def snapshot(module, args, kwargs):
        seen.update({name: "forward" in m.__dict__ for name, m in model.model.named_modules()
                     if type(m) is torch.nn.Linear})
    handle = model.layers[0].register_forward_pre_hook(snapshot, with_kwargs=True)
    try:
        capture_tokens(model, [[5, 6, 7]], [[8, 9]], layers=[2], progress=False)
    finally:
        handle.remove()
    packed = {name for name, on in seen.items() if on}
    assert packed and all(".layers.0." in n or ".layers.1." in n for n in packed)
    assert len(packed) == sum(type(m) is torch.nn.Linear for blk in model.layers[:2] for m in blk.modules())


def test_linears_stay_unpacked_when_packing_is_off(model, monkeypatch):
    monkeypatch.setattr(activations, "PACK_LINEARS", False)
    patched = []
    handle = model.layers[0].register_forward_pre_hook(lambda m, a, k: patched.extend(
        n for n, mod in model.model.named_modules() if "forward" in mod.__dict__), with_kwargs=True)
    try:
        res = capture_tokens(model, [[5, 6, 7]], [[8, 9]], layers=[2], progress=False)
    finally:
        handle.remove()
    assert patched == [] and res.means["response_avg"].isfinite().all()
