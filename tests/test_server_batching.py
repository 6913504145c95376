"""The model server's continuous batching, streaming and online monitoring, through the real
``openai`` client over HTTP on tiny random models."""

from __future__ import annotations

import json
import threading

import httpx
import openai
import pytest
import torch
from conftest import serve_app, wait_until

from persona_ops.chat import prompt_ids
from persona_ops.inference.server import ServerLimits, create_app
from persona_ops.interp.capture import capture_tokens, load_token_rows
from persona_ops.interp.space import fit_persona_space

MODEL = "tiny-batching"
MESSAGES = [{"role": "user", "content": "Tell me about pirates."}]
IDS = {"return_tokens_as_token_ids": True}


@pytest.fixture(scope="module")
def served(smol_tokenizer, tmp_path_factory):
    """A 3-layer model with a vector ``v``, a persona space ``assistant`` and a LoRA adapter ``lora``."""
    from peft import LoraConfig, get_peft_model

    from persona_ops.models.loading import LoadedModel, tiny_model

    loaded = LoadedModel(model=tiny_model("llama", num_layers=3, hidden=64, vocab_tokenizer=smol_tokenizer, seed=3),
                         tokenizer=smol_tokenizer, label=MODEL)
    adapter_dir = tmp_path_factory.mktemp("lora")
    get_peft_model(tiny_model("llama", num_layers=3, hidden=64, vocab_tokenizer=smol_tokenizer, seed=3),
                   LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
                   ).save_pretrained(adapter_dir)
    g = torch.Generator().manual_seed(0)
    vector = torch.randn(4, 64, generator=g)
    roles = {f"role{i}": torch.randn(4, 64, generator=g) for i in range(3)}
    space = fit_persona_space(roles, torch.randn(4, 64, generator=g), layer=2)
    app = create_app(loaded, vectors={"v": vector}, axes={"assistant": space}, adapters={"lora": str(adapter_dir)},
                     limits=ServerLimits(max_batch=8, max_queue=8))
    with serve_app(app) as url, openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=60) as client:
        yield client, app, loaded, vector, space


def _ids(choice) -> list[int]:
    return [int(e.token.removeprefix("token_id:")) for e in choice.logprobs.content]


def test_a_request_joins_a_running_batch_and_leaves_before_it(served):
    """A short request sent while a long one decodes is answered while the long one still streams."""
    client, app, *_ = served
    stream = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=400, temperature=0.9, seed=1,
                                            stream=True)
    chunks, short = iter(stream), None
    for _ in range(5):  # the long request is decoding
        next(chunks)
    steps_before = app.state.batcher.stats["steps"]
    short = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=3, temperature=0)
    rest = list(chunks)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 3
    assert rest and rest[-1].choices[0].finish_reason == "length"  # the long one went on after the short one
    assert app.state.batcher.stats["steps"] - steps_before < 400  # it did not wait for the long one to end
    assert app.state.batcher.stats["peak_rows"] >= 2


def test_base_and_adapter_rows_decode_together_as_alone(served):
    """Concurrent requests on the base model and on its adapter (one batch, adapters applied per row) give what
    each gives alone."""
    client, app, *_ = served
    requests = [dict(model=m, messages=[{"role": "user", "content": f"Question {i}?"}], max_tokens=6, temperature=t,
                     seed=i) for i, (m, t) in enumerate([(MODEL, 0), ("lora", 0), (MODEL, 1.0), ("lora", 0.8)] * 2)]
    results: list = [None] * len(requests)

    def send(i):
        results[i] = client.chat.completions.create(**requests[i]).choices[0].message.content

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    alone = [client.chat.completions.create(**r).choices[0].message.content for r in requests]
    assert results == alone
    assert alone[0] != alone[1]  # the adapter changes the model
    assert app.state.batcher.stats["peak_rows"] >= 2


def test_stream_is_the_same_completion_chunk_by_chunk(served):
    client, *_ = served
    kwargs = dict(model=MODEL, messages=MESSAGES, max_tokens=12, temperature=0.9, seed=7, n=2, logprobs=True)
    whole = client.chat.completions.create(**kwargs)
    parts, finish, usage = {0: "", 1: ""}, {}, None
    for chunk in client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs):
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            parts[c.index] += c.delta.content or ""
            if c.finish_reason:
                finish[c.index] = c.finish_reason
    assert [parts[0], parts[1]] == [c.message.content for c in whole.choices]
    assert finish == {0: "length", 1: "length"}
    assert usage.completion_tokens == whole.usage.completion_tokens == 24


def test_a_stop_string_never_reaches_the_stream(served):
    client, *_ = served
    kwargs = dict(model=MODEL, messages=MESSAGES, max_tokens=16, temperature=0)
    full = client.chat.completions.create(**kwargs).choices[0].message.content
    stop = full[len(full) // 2:len(full) // 2 + 3]
    streamed = "".join(c.choices[0].delta.content or "" for c in
                       client.chat.completions.create(stop=[stop], stream=True, **kwargs) if c.choices)
    assert streamed == full[:full.index(stop)]
    assert client.chat.completions.create(stop=[stop], **kwargs).choices[0].message.content == streamed


def test_completions_stream_and_echo(served):
    client, _, loaded, *_ = served
    prompt = "Once upon a time"
    whole = client.completions.create(model=MODEL, prompt=prompt, max_tokens=5, temperature=0, echo=True, logprobs=1)
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=5, temperature=0, echo=True, stream=True))
    assert whole.choices[0].text == streamed and streamed.startswith(prompt)
    lp = whole.choices[0].logprobs
    prompt_len = len(loaded.tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert len(lp.tokens) == prompt_len + 5 and lp.token_logprobs[0] is None
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0


def _captured_projections(loaded, prompt: list[int], answer: list[int], unit: torch.Tensor, layer: int, tmp_path):
    """A separate capture of prompt + answer: the projection at the positions predicting each answer token."""
    res = capture_tokens(loaded, [prompt], [answer], layers=[layer], aggregates=["none"], shard_dir=tmp_path,
                         progress=False)
    rows = load_token_rows(res.shards, layer)
    h = rows["rows"][rows["position"].argsort()].float()
    return (h @ unit)[len(prompt) - 1:len(prompt) - 1 + len(answer)], (h[:len(prompt)] @ unit).mean()


@pytest.mark.parametrize("layer", [2, 3])  # 3 = num_layers: after the final norm, as capture
def test_monitor_projections_equal_a_separate_capture(served, layer, tmp_path):
    client, _, loaded, vector, space = served
    monitor = [{"vector": "v", "layer": layer}, {"axis": "assistant", "threshold": -1e9}]
    resp = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=10, temperature=0.8, seed=3,
                                          logprobs=True, extra_body={"monitor": monitor, **IDS})
    choice = resp.choices[0]
    report = resp.model_dump()["choices"][0]["monitor"]
    answer, prompt = _ids(choice), prompt_ids(loaded.tokenizer, MESSAGES)
    for entry, unit, at in ((report[0], vector[layer] / vector[layer].norm(), layer),
                            (report[1], space.unit_axis().float(), space.layer)):
        expected, prompt_mean = _captured_projections(loaded, prompt, answer, unit, at, tmp_path / str(at))
        assert entry["layer"] == at and len(entry["tokens"]) == len(answer)
        assert entry["tokens"] == pytest.approx(expected.tolist(), abs=1e-4)
        assert entry["mean"] == pytest.approx(float(expected.mean()), abs=1e-4)
        assert entry["prompt_mean"] == pytest.approx(float(prompt_mean), abs=1e-4)
    assert report[0]["crossed_at"] is None and report[1]["crossed_at"] == 0
    streamed = []
    for chunk in client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=10, temperature=0.8,
                                                seed=3, stream=True, extra_body={"monitor": monitor}):
        for c in chunk.choices:
            streamed += [values[0] for values in (c.model_extra or {}).get("monitor", [])]
    assert streamed == pytest.approx(report[0]["tokens"], abs=1e-5)


def test_monitoring_a_steered_row_sees_the_steering(served):
    """A monitor at the steered layer reads the stream after the edit: + coef * |v| on every response position."""
    client, _, _, vector, _ = served
    monitor = {"monitor": [{"vector": "v", "layer": 2}]}
    kwargs = dict(model=MODEL, messages=MESSAGES, max_tokens=1, temperature=0)
    plain = client.chat.completions.create(**kwargs, extra_body=monitor).model_dump()["choices"][0]["monitor"][0]
    steered = client.chat.completions.create(**kwargs, extra_body={
        **monitor, "steering": [{"vector": "v", "layer": 2, "coef": 2.0}]}).model_dump()["choices"][0]["monitor"][0]
    assert steered["tokens"][0] - plain["tokens"][0] == pytest.approx(2.0 * float(vector[2].norm()), rel=1e-4)
    assert steered["prompt_mean"] != pytest.approx(plain["prompt_mean"])  # the last prompt token is steered too


def test_a_client_gone_frees_its_rows(served):
    client, app, *_ = served
    url = str(client.base_url)
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 2000, "stream": True, "n": 3}
    with httpx.stream("POST", f"{url}chat/completions", json=body, timeout=60) as resp:
        lines = resp.iter_lines()
        for line in lines:
            if line.startswith("data: ") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                break
        assert app.state.batcher.running() == 3
    wait_until(lambda: app.state.batcher.running() == 0, "the rows of a closed stream leaving")
    wait_until(lambda: app.state.admission.inside == 0, "the request leaving")


def test_bad_monitor_and_batch_requests_are_400(served):
    client, *_ = served
    with pytest.raises(openai.BadRequestError, match=r"monitor\[0\].axis 'nope' unknown"):
        client.chat.completions.create(model=MODEL, messages=MESSAGES, extra_body={"monitor": [{"axis": "nope"}]})
    with pytest.raises(openai.BadRequestError, match=r"monitor\[0\].layer 7"):
        client.chat.completions.create(model=MODEL, messages=MESSAGES, extra_body={"monitor": [{"vector": "v",
                                                                                                 "layer": 7}]})
    with pytest.raises(openai.BadRequestError, match="decodes at most 8 together"):
        client.completions.create(model=MODEL, prompt=["a", "b", "c"], n=3, max_tokens=2)


def test_the_kv_limit_counts_every_prompt_of_a_request(smol_tokenizer):
    from persona_ops.models.loading import LoadedModel, tiny_model

    loaded = LoadedModel(model=tiny_model("llama", num_layers=2, hidden=64, vocab_tokenizer=smol_tokenizer),
                         tokenizer=smol_tokenizer, label="tiny-kv")
    with serve_app(create_app(loaded, limits=ServerLimits(max_request_tokens=100))) as url, \
            openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=30) as client:
        assert client.completions.create(model="tiny-kv", prompt=[[5] * 30], max_tokens=25).choices
        with pytest.raises(openai.BadRequestError, match="summed over 2 prompts"):
            client.completions.create(model="tiny-kv", prompt=[[5] * 30, [6] * 30], max_tokens=25)


def test_n_completions_share_one_prefill_and_sample_apart(served):
    """n rows of a prompt: one prefill (the first tokens' logprobs are equal), different samples."""
    client, app, *_ = served
    before = app.state.batcher.stats["rows"]
    resp = client.chat.completions.create(model=MODEL, messages=MESSAGES, n=4, max_tokens=6, temperature=1.0,
                                          seed=11, logprobs=True, top_logprobs=3)
    assert app.state.batcher.stats["rows"] - before == 4
    tops = [[t.logprob for t in c.logprobs.content[0].top_logprobs] for c in resp.choices]
    assert all(t == tops[0] for t in tops)
    assert len({c.message.content for c in resp.choices}) > 1
    alone = client.chat.completions.create(model=MODEL, messages=MESSAGES, n=1, max_tokens=6, temperature=1.0,
                                           seed=11)
    assert alone.choices[0].message.content == resp.choices[0].message.content
