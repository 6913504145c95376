"""The OpenAI-compatible model server, driven by the official ``openai`` client over real HTTP."""

from __future__ import annotations

import json
import logging
import math
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch
import uvicorn
from conftest import serve_app, wait_until
from typer.testing import CliRunner

from persona_ops.chat import prompt_ids
from persona_ops.cli import app as cli_app
from persona_ops.errors import InputError
from persona_ops.inference.server import API_KEY_ENV, ServerLimits, TokenBytes, create_app
from persona_ops.interp.vectors import save_vectors
from persona_ops.judge import aggregate_token_logprobs
from persona_ops.judge.local import digit_token_ids
from persona_ops.judge.openai_backend import OpenAIJudge

MESSAGES = [{"role": "user", "content": "Tell me about pirates."}]
TINY, STEER = "tiny-random-llama@test", "tiny-steer"  # the ids the test servers advertise


@pytest.fixture(scope="module")
def server_url(tiny_loaded):
    """uvicorn serving the tiny model on a free 127.0.0.1 port, in a background thread."""
    with serve_app(create_app(tiny_loaded)) as url:
        yield url


@pytest.fixture(scope="module")
def client(server_url):
    with openai.OpenAI(base_url=server_url, api_key="unused", max_retries=0, timeout=30) as c:
        yield c


def test_models(client, tiny_loaded):
    ids = [m.id for m in client.models.list().data]
    assert ids == [tiny_loaded.label]


def test_n_and_max_tokens(client, tiny_loaded):
    resp = client.chat.completions.create(model=TINY, messages=MESSAGES, n=2, max_tokens=5,
                                          temperature=1.0, seed=1, logprobs=True)
    assert resp.object == "chat.completion" and resp.id.startswith("chatcmpl-")
    assert [c.index for c in resp.choices] == [0, 1]
    for choice in resp.choices:
        # a random model almost never emits end-of-sequence within 5 of ~49k tokens
        assert choice.finish_reason == "length" and len(choice.logprobs.content) == 5
        assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert resp.choices[0].message.content != resp.choices[1].message.content
    prompt_len = len(prompt_ids(tiny_loaded.tokenizer, MESSAGES))
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens, resp.usage.total_tokens) \
        == (prompt_len, 10, prompt_len + 10)


def test_seed_reproducible(client):
    def sample(seed: int) -> list[str]:
        resp = client.chat.completions.create(model=TINY, messages=MESSAGES, n=2, max_tokens=6,
                                              temperature=1.0, top_p=0.9, seed=seed)
        return [c.message.content for c in resp.choices]

    assert sample(7) == sample(7)
    assert sample(7) != sample(8)


def test_logprobs_match_the_model(client, tiny_loaded):
    resp = client.chat.completions.create(model=TINY, messages=MESSAGES, max_tokens=4, temperature=0,
                                          logprobs=True, top_logprobs=5)
    content = resp.choices[0].logprobs.content
    assert len(content) == 4
    for entry in content:
        tops = [t.logprob for t in entry.top_logprobs]
        assert len(tops) == 5 and tops == sorted(tops, reverse=True)
        assert entry.logprob <= 0 and sum(math.exp(t) for t in tops) <= 1 + 1e-6
        # greedy: the chosen token is the most likely one
        assert entry.token == entry.top_logprobs[0].token and entry.logprob == pytest.approx(tops[0])
        assert bytes(entry.bytes).decode("utf-8", errors="replace") == entry.token
    # the first position, recomputed directly from the model in fp32
    ids = prompt_ids(tiny_loaded.tokenizer, MESSAGES)
    with torch.no_grad():
        logp = torch.log_softmax(tiny_loaded.model(torch.tensor([ids])).logits[0, -1].float(), dim=-1)
    top = logp.topk(5)
    assert [t.logprob for t in content[0].top_logprobs] == pytest.approx(top.values.tolist(), abs=1e-4)
    expected = [tiny_loaded.tokenizer.decode([i]) for i in top.indices.tolist()]
    assert [t.token for t in content[0].top_logprobs] == expected
    text = b"".join(bytes(e.bytes) for e in content).decode("utf-8", errors="replace")
    assert text == resp.choices[0].message.content


def test_stop_sequence(client):
    kwargs = dict(model=TINY, messages=MESSAGES, max_tokens=8, temperature=0, logprobs=True)
    full = client.chat.completions.create(**kwargs).choices[0]
    tokens = [e.token for e in full.logprobs.content]
    stop = next(t for t in tokens[2:] if t.strip() and "\ufffd" not in t)
    cut = client.chat.completions.create(stop=[stop], **kwargs).choices[0]
    assert cut.finish_reason == "stop"
    assert cut.message.content == full.message.content[:full.message.content.index(stop)]
    assert len(cut.logprobs.content) < len(tokens)
    cut_resp = client.chat.completions.create(stop=[stop], **kwargs)
    # usage counts the tokens generated until the stop string was complete (it is not returned)
    assert cut_resp.usage.completion_tokens == len(cut_resp.choices[0].logprobs.content) + 1


def test_sampled_tokens_are_the_counter_based_draws_from_the_model(client, tiny_loaded):
    """Row j of a seeded request draws its t-th token at the uniform of (hash(seed, j), t) from the
    model's own tempered, nucleus-filtered distribution (recomputed here by teacher forcing)."""
    from persona_ops.inference.batcher import row_key
    from persona_ops.inference.sampling import row_uniforms, sample_rows

    resp = client.chat.completions.create(model=TINY, messages=MESSAGES, n=3, max_tokens=6, temperature=0.8,
                                          top_p=0.9, seed=21, logprobs=True,
                                          extra_body={"return_tokens_as_token_ids": True})
    prompt = prompt_ids(tiny_loaded.tokenizer, MESSAGES)
    for j, choice in enumerate(resp.choices):
        tokens = [int(e.token.removeprefix("token_id:")) for e in choice.logprobs.content]
        with torch.no_grad():
            logits = tiny_loaded.model(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1:-1]
        steps = torch.arange(len(tokens))
        keys = torch.full_like(steps, row_key(21, j))
        drawn = sample_rows(logits, torch.full((len(tokens),), 0.8), torch.full((len(tokens),), 0.9),
                            row_uniforms(keys, steps))
        assert drawn.tolist() == tokens
    assert len({c.message.content for c in resp.choices}) == 3


def test_bad_requests(client, server_url):
    with pytest.raises(openai.BadRequestError, match="top_logprobs"):
        client.chat.completions.create(model=TINY, messages=MESSAGES, logprobs=True, top_logprobs=25)
    with pytest.raises(openai.BadRequestError, match="n: Input should be greater"):
        client.chat.completions.create(model=TINY, messages=MESSAGES, n=0)
    with pytest.raises(openai.BadRequestError, match="max_tokens=0 generates nothing"):
        client.completions.create(model=TINY, prompt="Hello", max_tokens=0)
    with pytest.raises(openai.BadRequestError, match="prompt"):
        client.completions.create(model=TINY, prompt=[[1, 2], [10 ** 9]], max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="monitor.0"):
        client.chat.completions.create(model=TINY, messages=MESSAGES, extra_body={"monitor": [{"layer": 2}]})
    resp = httpx.post(f"{server_url}/chat/completions", content=b"{not json", timeout=10,
                      headers={"Content-Type": "application/json"})
    assert resp.status_code == 400 and resp.json()["error"]["type"] == "invalid_request_error"
    resp = httpx.post(f"{server_url}/chat/completions", json={"messages": []}, timeout=10)
    assert resp.status_code == 400 and "messages" in resp.json()["error"]["message"]


def test_openai_judge_against_server(client, server_url, tiny_loaded, monkeypatch):
    """OpenAIJudge over real HTTP gives what the server's top-20 logprobs aggregate to."""
    monkeypatch.delenv("PERSONA_OPS_NO_SUCH_KEY", raising=False)  # a local server needs no key
    judge = OpenAIJudge(tiny_loaded.label, base_url=server_url, api_key_env="PERSONA_OPS_NO_SUCH_KEY")
    prompts = ["How evil is this? Answer 0-100.", "Rate the coherence of 'hello world' from 0 to 100."]
    # favour digit tokens so that the random model gives numeric answers
    head = tiny_loaded.model.get_output_embeddings()
    bias = torch.zeros(head.weight.shape[0])
    bias[digit_token_ids(tiny_loaded.tokenizer)] = 9.0
    handle = head.register_forward_hook(lambda m, i, out: out + bias)
    try:
        results = judge.score_prompts(prompts)
        direct = [client.chat.completions.create(
            model=tiny_loaded.label, messages=[{"role": "user", "content": p}], max_tokens=1, temperature=0,
            logprobs=True, top_logprobs=20, seed=0).choices[0].logprobs.content[0].top_logprobs
            for p in prompts]
    finally:
        handle.remove()
    for (score, probs), top in zip(results, direct):
        assert score is not None and 0 <= score <= 100
        assert len(top) == 20 and set(probs) <= set(range(10))
        assert score == pytest.approx(aggregate_token_logprobs([(t.token, t.logprob) for t in top]), rel=1e-6)


@pytest.fixture(scope="module")
def steer_model(smol_tokenizer, tmp_path_factory):
    """A tiny model, a vector ``[4, 64]`` for it and a LoRA adapter directory."""
    from peft import LoraConfig, get_peft_model

    from persona_ops.models.loading import LoadedModel, tiny_model

    model = tiny_model("llama", num_layers=3, hidden=64, vocab_tokenizer=smol_tokenizer, seed=1)
    adapter_dir = tmp_path_factory.mktemp("adapter")
    peft_model = get_peft_model(tiny_model("llama", num_layers=3, hidden=64, vocab_tokenizer=smol_tokenizer, seed=1),
                                LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft_model.save_pretrained(adapter_dir)
    loaded = LoadedModel(model=model, tokenizer=smol_tokenizer, label=STEER)
    vec = torch.randn(4, 64, generator=torch.Generator().manual_seed(0)) * 20
    return loaded, vec, adapter_dir


@pytest.fixture(scope="module")
def steer_client(steer_model):
    """A server with a named vector and a LoRA adapter, on its own tiny model."""
    loaded, vec, adapter_dir = steer_model
    app = create_app(loaded, vectors={"evil": vec}, adapters={"pirate": str(adapter_dir)})
    with serve_app(app) as url:
        with openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=30) as c:
            yield c


def _ask(client, model=STEER, **extra):
    resp = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=8, temperature=0,
                                          logprobs=True, extra_body=extra or None)
    return resp.choices[0].message.content, [t.logprob for t in resp.choices[0].logprobs.content]


def test_steered_request_from_the_openai_client(steer_client):
    plain = _ask(steer_client)
    assert _ask(steer_client, steering=[{"vector": "evil", "layer": 2, "coef": 0.0}]) == plain  # coef 0 = unsteered
    steered = _ask(steer_client, steering=[{"vector": "evil", "layer": 2, "coef": 8.0}])
    assert steered != plain
    both = _ask(steer_client, steering=[{"vector": "evil", "layer": 2, "coef": 8.0},
                                        {"vector": "evil", "layer": 3, "kind": "ablate", "coef": 1.0}])
    assert both != steered  # interventions compose
    with pytest.raises(openai.BadRequestError, match="unknown"):
        _ask(steer_client, steering=[{"vector": "kind", "layer": 2}])
    with pytest.raises(openai.BadRequestError, match="layer"):
        _ask(steer_client, steering=[{"vector": "evil", "layer": 4}])


def test_adapter_per_request(steer_client):
    plain = _ask(steer_client)
    adapted = _ask(steer_client, adapter="pirate")
    assert adapted[1] != plain[1]  # the adapter changes the distribution
    assert _ask(steer_client) == plain  # and is removed again for a plain request
    assert _ask(steer_client, adapter="pirate") == adapted
    with pytest.raises(openai.BadRequestError, match="adapter"):
        _ask(steer_client, adapter="nope")


def test_steered_sampled_logprobs_are_the_steered_models(steer_client, steer_model):
    """Sampled + steered: the tokens' logprobs are those of a plain forward with persona_vectors'
    hook (block layer-1 gets coef * v from the last prompt token on)."""
    loaded, vec, _ = steer_model
    steering = {"steering": [{"vector": "evil", "layer": 2, "coef": 3.0}]}
    resp = steer_client.chat.completions.create(model=STEER, messages=MESSAGES, max_tokens=6, temperature=1.0,
                                                seed=5, logprobs=True, top_logprobs=3,
                                                extra_body={**steering, "return_tokens_as_token_ids": True})
    prompt = prompt_ids(loaded.tokenizer, MESSAGES)
    content = resp.choices[0].logprobs.content
    tokens = [int(e.token.removeprefix("token_id:")) for e in content]
    assert [bytes(e.bytes) for e in content] == [TokenBytes(loaded.tokenizer)(t) for t in tokens]

    def hook(module, args, output):
        h = (output[0] if isinstance(output, tuple) else output).clone()
        h[:, len(prompt) - 1:] += 3.0 * vec[2]
        return (h,) + tuple(output[1:]) if isinstance(output, tuple) else h

    handle = loaded.layers[1].register_forward_hook(hook)
    try:
        with torch.no_grad():
            logits = loaded.model(torch.tensor([prompt + tokens[:-1]])).logits[0, len(prompt) - 1:]
    finally:
        handle.remove()
    logp = torch.log_softmax(logits.float(), dim=-1)
    expected = [float(logp[j, t]) for j, t in enumerate(tokens)]
    assert [e.logprob for e in content] == pytest.approx(expected, abs=1e-4)
    assert [t.logprob for t in content[0].top_logprobs] == pytest.approx(logp[0].topk(3).values.tolist(), abs=1e-4)
    plain = steer_client.chat.completions.create(model=STEER, messages=MESSAGES, max_tokens=6, temperature=1.0,
                                                 seed=5, logprobs=True)
    assert [e.logprob for e in plain.choices[0].logprobs.content] != pytest.approx(expected, abs=1e-4)


# ----------------------------------------------------------------------------- hardening

KEY = "sk-test-SERVER-KEY-0123456789"


@pytest.fixture(scope="module")
def keyed_url(tiny_loaded):
    with serve_app(create_app(tiny_loaded, api_key=KEY)) as url:
        yield url


def test_api_key_is_required_everywhere(keyed_url, caplog):
    caplog.set_level(logging.DEBUG)
    with openai.OpenAI(base_url=keyed_url, api_key="sk-wrong-key", max_retries=0, timeout=30) as wrong:
        with pytest.raises(openai.AuthenticationError) as err:
            wrong.models.list()
        assert err.value.code == "invalid_api_key" and "sk-wrong-key" not in str(err.value)
        with pytest.raises(openai.AuthenticationError):
            wrong.chat.completions.create(model=TINY, messages=MESSAGES, max_tokens=2)
    for headers in ({}, {"Authorization": f"Basic {KEY}"}, {"Authorization": f"Bearer {KEY}x"}):
        resp = httpx.get(f"{keyed_url}/models", headers=headers, timeout=10)
        assert resp.status_code == 401 and resp.json()["error"]["type"] == "invalid_request_error"
        assert resp.headers["www-authenticate"] == "Bearer" and KEY not in resp.text
    with openai.OpenAI(base_url=keyed_url, api_key=KEY, max_retries=0, timeout=30) as right:
        assert [m.id for m in right.models.list().data] == [TINY]
        assert right.chat.completions.create(model=TINY, messages=MESSAGES, max_tokens=2).choices
    assert KEY not in caplog.text


@pytest.fixture(scope="module")
def tiny_dir(smol_tokenizer, tmp_path_factory):
    """A 2-layer random model saved as a local model directory (what ``serve-model --model`` loads)."""
    from persona_ops.models.loading import tiny_model

    path = tmp_path_factory.mktemp("tiny-model")
    tiny_model("llama", num_layers=2, hidden=64, vocab_tokenizer=smol_tokenizer).save_pretrained(path)
    smol_tokenizer.save_pretrained(path)
    return path


def _serve_model_cli(args: list[str], monkeypatch, env: dict | None = None):
    """``persona-ops serve-model ARGS`` up to where it would start serving: the result and the app it built."""
    built = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: built.append(app))
    result = CliRunner().invoke(cli_app, ["serve-model", *args], env=env)
    return result, (built[0] if built else None)


def test_serve_model_takes_the_key_and_limits_from_the_command_line(tiny_dir, monkeypatch):
    help_text = CliRunner().invoke(cli_app, ["serve-model", "--help"], env={API_KEY_ENV: KEY}).output
    assert API_KEY_ENV in help_text and KEY not in help_text
    result, served = _serve_model_cli(["--model", str(tiny_dir), "--max-batch", "2", "--max-queue", "3",
                                       "--max-request-tokens", "100"], monkeypatch, env={API_KEY_ENV: KEY})
    assert result.exit_code == 0, result.output
    assert KEY not in result.output and served.state.admission.capacity == 5
    assert served.state.batcher.max_rows == 2
    with serve_app(served) as url:
        assert httpx.get(f"{url}/models", timeout=10).status_code == 401
        with openai.OpenAI(base_url=url, api_key=KEY, max_retries=0, timeout=30) as c:
            model = c.models.list().data[0].id
            assert c.chat.completions.create(model=model, messages=MESSAGES, max_tokens=2).choices
            with pytest.raises(openai.BadRequestError, match="limit is 100 tokens"):
                c.chat.completions.create(model=model, messages=MESSAGES, n=2, max_tokens=40)


def test_unknown_model_is_404(client, steer_client):
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=2)
    assert err.value.code == "model_not_found" and TINY in str(err.value)
    assert client.chat.completions.create(model=TINY, messages=MESSAGES, max_tokens=2).model == TINY
    # the adapters are served models too: listed with their parent, and naming one selects it
    assert [(m.id, getattr(m, "parent", None)) for m in steer_client.models.list().data] \
        == [(STEER, None), ("pirate", STEER)]
    assert _ask(steer_client, model="pirate") == _ask(steer_client, adapter="pirate") != _ask(steer_client)


def test_max_tokens_beyond_the_context_is_400(client, tiny_loaded):
    context = tiny_loaded.model.config.max_position_embeddings
    with pytest.raises(openai.BadRequestError, match=f"context of {context} tokens"):
        client.chat.completions.create(model=TINY, messages=MESSAGES, max_tokens=context)
    # n rows x (prompt + max_tokens): the KV cache one request reserves
    with pytest.raises(openai.BadRequestError, match="limit is 32768 tokens"):
        client.chat.completions.create(model=TINY, messages=MESSAGES, n=32, max_tokens=1500)


def test_vectors_are_checked_against_the_model_at_startup(tiny_dir, tiny_loaded, tmp_path, monkeypatch):
    files = {}
    for name, shape in {"good": (3, 64), "wide": (3, 32), "deep": (5, 64)}.items():
        files[name] = tmp_path / f"{name}.safetensors"
        save_vectors(files[name], {"response_avg": torch.zeros(shape)}, {})
    for bad, found in (("wide", "[3, 32]"), ("deep", "[5, 64]")):
        result, served = _serve_model_cli(["--model", str(tiny_dir), "--vector", f"good={files['good']}",
                                           "--vector", f"{bad}={files[bad]}"], monkeypatch)
        assert result.exit_code == 2 and served is None
        assert f"{files[bad]}: expected a [3, 64] tensor" in result.output and f"found {found}" in result.output
    with pytest.raises(InputError, match=r"vector 'evil': expected a \[5, 64\] tensor .* found \[5, 32\]"):
        create_app(tiny_loaded, vectors={"evil": torch.zeros(5, 32)})


def test_steering_layer_out_of_range_is_400(steer_client):
    for layer in (0, 4, 99):
        with pytest.raises(openai.BadRequestError, match=r"steering\[0\]\.layer \d+: expected 1\.\.3"):
            _ask(steer_client, steering=[{"vector": "evil", "layer": layer}])


def test_seed_out_of_range_is_400(client):
    for seed in (2 ** 63, 2 ** 64, -2 ** 63 - 1):
        with pytest.raises(openai.BadRequestError, match=r"seed: expected an integer in -2\*\*63\.\.2\*\*63-1"):
            client.chat.completions.create(model=TINY, messages=MESSAGES, max_tokens=2, seed=seed)
    for seed in (-1, 2 ** 63 - 1):
        assert client.chat.completions.create(model=TINY, messages=MESSAGES, max_tokens=2, seed=seed).choices


@pytest.mark.parametrize("field, value", [("coef", float("nan")), ("coef", float("inf")), ("tau", float("-inf")),
                                          ("temperature", float("nan")), ("top_p", float("nan")),
                                          ("n", float("inf")), ("top_logprobs", float("nan")),
                                          ("max_tokens", float("inf"))])
def test_non_finite_numbers_are_400(steer_client, field, value):
    """The openai client cannot send NaN or infinity (strict JSON); other clients can (Python's json does)."""
    body = {"model": STEER, "messages": MESSAGES, "max_tokens": 2, "logprobs": True,
            "steering": [{"vector": "evil", "layer": 2, "kind": "add"}]}
    if field in ("coef", "tau"):
        body["steering"][0][field] = value
    else:
        body[field] = value
    resp = httpx.post(f"{steer_client.base_url}chat/completions", content=json.dumps(body), timeout=30,
                      headers={"Content-Type": "application/json"})
    assert resp.status_code == 400, resp.text
    assert field in resp.json()["error"]["message"]


def test_negative_numbers_are_400(client):
    for bad in ({"temperature": -0.5}, {"top_p": -0.1}, {"top_p": 0}, {"n": -1}, {"max_tokens": -5},
                {"logprobs": True, "top_logprobs": -1}):
        with pytest.raises(openai.BadRequestError, match=next(iter(bad.keys() - {"logprobs"}))):
            client.chat.completions.create(model=TINY, messages=MESSAGES, **{"max_tokens": 2, **bad})


def test_full_queue_is_429_with_retry_after(smol_tokenizer):
    """One request generating and ``max_queue`` waiting fill the server; the next are refused at once."""
    from persona_ops.models.loading import LoadedModel, tiny_model

    loaded = LoadedModel(model=tiny_model("llama", num_layers=2, hidden=64, vocab_tokenizer=smol_tokenizer),
                         tokenizer=smol_tokenizer, label="tiny-gated")
    app = create_app(loaded, limits=ServerLimits(max_batch=1, max_queue=2))
    admission, gate = app.state.admission, threading.Event()

    def hold(module, args):  # the first request generates only once every request is in or refused
        gate.wait(60)

    handle = loaded.model.register_forward_pre_hook(hold)
    try:
        with serve_app(app) as url, openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=60) as c, \
                ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(_status, c, "tiny-gated") for _ in range(6)]
            wait_until(lambda: admission.inside + admission.refused == 6, "six requests")
            gate.set()
            answers = sorted(f.result() for f in futures)
    finally:
        gate.set()
        handle.remove()
    assert answers == [(200, None)] * 3 + [(429, "1")] * 3
    assert admission.peak == 3 and admission.inside == 0


def _status(client, model: str) -> tuple[int, str | None]:
    """A chat request's HTTP status and Retry-After header."""
    try:
        client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=3)
        return 200, None
    except openai.APIStatusError as e:
        return e.status_code, e.response.headers.get("retry-after")


def test_oversized_body_is_413(smol_tokenizer):
    from persona_ops.models.loading import LoadedModel, tiny_model

    loaded = LoadedModel(model=tiny_model("llama", num_layers=2, hidden=64, vocab_tokenizer=smol_tokenizer),
                         tokenizer=smol_tokenizer, label="tiny-small-bodies")
    with serve_app(create_app(loaded, limits=ServerLimits(max_body_bytes=4096))) as url, \
            openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=30) as c:
        with pytest.raises(openai.APIStatusError, match="over 4096 bytes") as err:
            c.chat.completions.create(model="tiny-small-bodies", messages=[{"role": "user", "content": "x" * 5000}])
        assert err.value.status_code == 413
        assert c.chat.completions.create(model="tiny-small-bodies", messages=MESSAGES, max_tokens=2).choices
        assert c.models.list().data[0].id == "tiny-small-bodies"
