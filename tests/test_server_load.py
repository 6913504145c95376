"""The model server under many concurrent clients (the real ``openai`` client over HTTP): every
request is answered, 200 or refused at once with 429/400, none hangs, no 5xx, and no more than
``max_batch + max_queue`` requests are ever inside the server."""

from __future__ import annotations

import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch
from conftest import serve_app, wait_until

from persona_ops.inference.server import ServerLimits, create_app

MAX_BATCH, MAX_QUEUE, CLIENTS = 4, 8, 48
INSIDE = MAX_BATCH + MAX_QUEUE  # the requests the server holds at most
MODEL = "tiny-load"
MESSAGES = [{"role": "user", "content": "Tell me about pirates."}]


@pytest.fixture(scope="module")
def server(smol_tokenizer):
    """A 2-layer tiny model served with a queue bound of 8; ``gate`` (set) holds generation while cleared."""
    from persona_ops.models.loading import LoadedModel, tiny_model

    loaded = LoadedModel(model=tiny_model("llama", num_layers=2, hidden=64, vocab_tokenizer=smol_tokenizer),
                         tokenizer=smol_tokenizer, label=MODEL)
    vector = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))
    app = create_app(loaded, vectors={"v": vector}, limits=ServerLimits(max_batch=MAX_BATCH, max_queue=MAX_QUEUE))
    gate = threading.Event()
    gate.set()

    def hold(module, args):  # a forward waits while the gate is closed
        gate.wait(60)

    handle = loaded.model.register_forward_pre_hook(hold)
    try:
        with serve_app(app) as url, openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=60) as c:
            yield c, app.state.admission, gate
    finally:
        gate.set()
        handle.remove()


def _status(client, **request) -> tuple[int, str | None]:
    """A chat request's HTTP status and Retry-After header."""
    try:
        client.chat.completions.create(**{"model": MODEL, "messages": MESSAGES, "max_tokens": 3, **request})
        return 200, None
    except openai.APIStatusError as e:
        return e.status_code, e.response.headers.get("retry-after")


def _raw_status(client, body: bytes) -> tuple[int, str | None]:
    """The status of a body the openai client cannot send (NaN)."""
    resp = httpx.post(f"{client.base_url}chat/completions", content=body, timeout=60,
                      headers={"Content-Type": "application/json"})
    return resp.status_code, resp.headers.get("retry-after")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_a_full_queue_refuses_at_once(server):
    """48 clients while the first generation is held: the 4 the batch holds + 8 queued are answered, 36 refused."""
    client, admission, gate = server
    refused_before = admission.refused
    gate.clear()
    try:
        with ThreadPoolExecutor(CLIENTS) as pool:
            futures = [pool.submit(_status, client, seed=i) for i in range(CLIENTS)]
            wait_until(lambda: admission.inside + admission.refused - refused_before == CLIENTS,
                        "every client admitted or refused")
            gate.set()
            answers = [f.result(timeout=120) for f in futures]
    finally:
        gate.set()
    assert sorted(answers) == [(200, None)] * INSIDE + [(429, "1")] * (CLIENTS - INSIDE)
    wait_until(lambda: admission.inside == 0, "every request left")  # it leaves after its response is sent
    assert admission.peak == INSIDE


BAD = [{"max_tokens": 4096}, {"seed": 2 ** 64}, {"n": 32, "max_tokens": 1500},
       {"extra_body": {"steering": [{"vector": "v", "layer": 9}]}}]


def _request(i: int) -> dict:
    """Client ``i``'s request: mostly valid (various n, lengths, steering), every 4th one bad."""
    if i % 4 == 3:
        return BAD[i // 4 % len(BAD)]
    steering = {"extra_body": {"steering": [{"vector": "v", "layer": 1 + i % 2, "coef": 2.0}]}} if i % 3 else {}
    return {"n": 1 + i % 3, "max_tokens": 2 + i % 5, "seed": i, "temperature": 0.7, "logprobs": i % 2 == 0,
            **steering}


def test_many_clients_are_all_answered_and_memory_stays_bounded(server):
    client, admission, _ = server
    assert _status(client)[0] == 200  # warm
    rss = _rss_bytes()
    nan_body = json.dumps({"model": MODEL, "messages": MESSAGES, "temperature": float("nan")}).encode()
    answers = []
    with ThreadPoolExecutor(CLIENTS) as pool:
        for _ in range(3):
            futures = {pool.submit(_status, client, **_request(i)): i for i in range(CLIENTS - 2)}
            futures.update({pool.submit(_raw_status, client, nan_body): -1 for _ in range(2)})
            answers += [(futures[f], *f.result(timeout=120)) for f in futures]
    statuses = {status for _, status, _ in answers}
    assert statuses <= {200, 400, 429} and 200 in statuses, statuses
    bad = [status for i, status, _ in answers if i < 0 or i % 4 == 3]
    good = [status for i, status, _ in answers if i >= 0 and i % 4 != 3]
    assert set(bad) <= {400, 429} and set(good) <= {200, 429}
    assert all(retry == "1" for _, status, retry in answers if status == 429)
    wait_until(lambda: admission.inside == 0, "every request left")
    assert admission.peak <= INSIDE
    # generous: requests hold small bodies and tiny KV caches; an unbounded queue of 32-row requests would not fit
    assert _rss_bytes() - rss < 512 << 20
