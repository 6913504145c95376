"""A fault-injecting OpenAI-compatible server on 127.0.0.1, for reliability tests.

``FaultServer`` is a real HTTP server (stdlib, one thread per connection) with
``GET /v1/models`` and ``POST /v1/chat/completions``. Chat replies are deterministic
functions of the request: with ``logprobs`` the first token's top logprobs are the
numeric answer distribution :func:`judge_distribution` derives from the prompt (so scores
are checkable with :func:`expected_score`; ``REFUSE`` or ``SILENT`` in a prompt give no
score); without, ``n`` answers derived from the prompt, the seed and the choice index
(:func:`completion_text`). A route's handler can be replaced (:meth:`FaultServer.route`).

A fault plan (:class:`Fault`) replaces the normal reply of matching requests: an HTTP
status (429 + ``Retry-After``, 500, 400, 401 ...), a hang past the client's timeout, a
dropped connection, a malformed body, a body of the wrong shape, or a 200 without
logprobs. A fault matches a route and, optionally, a substring of the request's
*subject* (for chat completions: the last message's text), and hits ``times`` requests
(``None``: every one). Requests are counted per subject (``counts``).

More routes plug in with :meth:`FaultServer.route` (a path may hold ``{name}`` parts, handed to the
handler as ``Request.params``; faults and counts use the template as the route); the fault plan
applies to them unchanged. :class:`FineTuneAPI` adds the OpenAI fine-tuning API this way (files,
jobs, events, cancel).
"""

from __future__ import annotations

import email.parser
import email.policy
import hashlib
import itertools
import json
import math
import re
import socket
import threading
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

CHAT = "/v1/chat/completions"
KINDS = ("status", "hang", "drop", "malformed", "wrong_shape", "no_logprobs")


@dataclass
class Request:
    """One request as a route handler sees it."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    params: dict[str, str] = field(default_factory=dict)  # the ``{name}`` parts of a templated route

    def json(self):
        return json.loads(self.body or b"{}")


@dataclass
class Reply:
    """What a route handler answers: a status, a JSON body (or raw bytes) and headers."""

    status: int = 200
    body: dict | list | bytes = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Fault:
    """Replace the reply of matching requests.

    ``kind``: ``status`` (answer ``status`` with ``headers`` and an OpenAI-style error
    ``message``), ``hang`` (answer nothing for ``seconds``), ``drop`` (close the connection
    without a response), ``malformed`` (a 200 whose JSON is cut off), ``wrong_shape`` (a 200
    of valid JSON that is no completion), ``no_logprobs`` (the normal reply with its logprobs
    removed).
    """

    kind: str
    match: str | None = None  # substring of the request's subject; None: every request of the route
    times: int | None = 1  # how many matching requests it hits; None: all of them
    route: str = CHAT
    status: int = 500
    headers: dict[str, str] = field(default_factory=dict)
    message: str = "injected fault"
    code: str | None = None  # the error body's ``code`` (e.g. OpenAI's ``insufficient_quota``)
    seconds: float = 30.0
    hits: int = 0

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"Fault.kind: expected one of {', '.join(KINDS)}, got {self.kind!r}")

    def takes(self, route: str, subject: str) -> bool:
        """Whether this fault hits the request (and count the hit)."""
        if route != self.route or (self.match is not None and self.match not in subject):
            return False
        if self.times is not None and self.hits >= self.times:
            return False
        self.hits += 1
        return True


# ----------------------------------------------------------------------------- deterministic answers


def _digest(*parts) -> int:
    return int.from_bytes(hashlib.sha256("\0".join(map(str, parts)).encode()).digest()[:8], "big")


def judge_distribution(prompt: str) -> dict[str, float]:
    """The first answer token's probabilities for a judge prompt: two numbers from the prompt's
    hash (0.6 and 0.3) and a word (0.1); a prompt containing ``REFUSE`` answers mostly in words
    (numeric mass 0.1: a legitimate "no score"; one containing ``SILENT`` ends its answer at once)."""
    h = _digest(prompt)
    a, b = h % 101, (h // 101) % 101
    if b == a:
        b = (a + 1) % 101
    if "REFUSE" in prompt:
        return {"I": 0.6, "Sorry": 0.3, str(a): 0.1}
    return {str(a): 0.6, str(b): 0.3, "Sure": 0.1}


def expected_score(prompt: str, lo: int = 0, hi: int = 100) -> float | None:
    """The judge score :func:`judge_distribution` implies (None below the 0.25 numeric mass)."""
    if "SILENT" in prompt:
        return None
    probs = {int(t): p for t, p in judge_distribution(prompt).items() if t.isdigit() and lo <= int(t) <= hi}
    mass = sum(probs.values())
    return None if mass < 0.25 else sum(k * p for k, p in probs.items()) / mass


def completion_text(prompt: str, seed, index: int) -> str:
    """The answer to a generation request: a function of the prompt, the seed and the choice index."""
    return f"answer-{_digest(prompt, seed, index) % 10**8:08d}"


def chat_subject(request: Request) -> str:
    """What faults match and counts count for a chat request: the last message's text."""
    try:
        messages = request.json().get("messages") or [{}]
        return str(messages[-1].get("content", ""))
    except (ValueError, AttributeError):
        return request.body.decode("utf-8", "replace")


def chat_completion(request: Request) -> Reply:
    """A chat completion: judge logprobs when asked, else ``n`` seeded answers."""
    body = request.json()
    prompt = chat_subject(request)
    if body.get("logprobs") and "SILENT" in prompt:  # the answer ends at once: no token, no logprobs entry
        choices = [{"index": 0, "message": {"role": "assistant", "content": ""}, "finish_reason": "stop",
                    "logprobs": {"content": []}}]
    elif body.get("logprobs"):
        top = [{"token": t, "logprob": math.log(p), "bytes": list(t.encode())}
               for t, p in judge_distribution(prompt).items()][: int(body.get("top_logprobs") or 1)]
        first = max(top, key=lambda e: e["logprob"])
        choices = [{"index": 0, "message": {"role": "assistant", "content": first["token"]}, "finish_reason": "length",
                    "logprobs": {"content": [{**first, "top_logprobs": top}]}}]
    else:
        texts = [completion_text(prompt, body.get("seed"), i) for i in range(int(body.get("n") or 1))]
        choices = [{"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": "stop",
                    "logprobs": None} for i, text in enumerate(texts)]
    return Reply(200, {"id": "chatcmpl-fault", "object": "chat.completion", "created": 0,
                       "model": body.get("model", "fault-model"), "choices": choices,
                       "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})


def _stated(prompt: str, label: str) -> str | None:
    """The value of a ``label: value`` line of a prompt (data generation states its counts so)."""
    m = re.search(rf"^{re.escape(label)}: (.+)$", prompt, re.MULTILINE)
    return m.group(1).strip() if m else None


def datagen_json(prompt: str) -> dict:
    """The JSON a data-generation prompt asks for, derived from it: a trait (``Trait:`` with
    ``Number of instruction pairs:`` and ``Number of questions:``) or a domain's questions
    (``Domain:`` and ``Number of questions:``)."""
    n = int(_stated(prompt, "Number of questions") or 0)
    tag = f"{_digest(prompt) % 10**6:06d}"
    domain = _stated(prompt, "Domain")
    if domain is not None:
        return {"questions": [f"{domain} question {i} ({tag})?" for i in range(n)]}
    name = _stated(prompt, "Trait") or "trait"
    pairs = int(_stated(prompt, "Number of instruction pairs") or 0)
    return {"instruction": [{"pos": f"Be very {name} ({i}).", "neg": f"Never be {name} ({i})."} for i in range(pairs)],
            "questions": [f"What do you think about topic {i} ({tag})?" for i in range(n)],
            "eval_prompt": f"Rate how {name} this is, 0-100.\nQuestion: {{question}}\nAnswer: {{answer}}"}


def datagen_completion(request: Request) -> Reply:
    """Chat completions for data generation: requests asking for a JSON object get
    :func:`datagen_json` of their prompt, the others :func:`chat_completion`'s answers."""
    body = request.json()
    if (body.get("response_format") or {}).get("type") != "json_object":
        return chat_completion(request)
    reply = chat_completion(request)
    reply.body["choices"][0]["message"]["content"] = json.dumps(datagen_json(chat_subject(request)))
    return reply


def _without_logprobs(reply: Reply) -> Reply:
    body = json.loads(json.dumps(reply.body))
    for choice in body.get("choices", []):
        choice["logprobs"] = None
    return Reply(reply.status, body, reply.headers)


# ----------------------------------------------------------------------------- the server


Handler = Callable[[Request], Reply]


class FaultServer:
    """The server (a context manager); ``url`` is its ``/v1`` base URL.

    ``faults``: the plan, tried in order for each request (the first that takes it wins;
    more with :meth:`add`). ``api_key``: when set, requests with another bearer token get a
    401 that echoes the token (as some services do), so tests can check it never leaks.
    ``route_counts[route][subject]``: requests received, faulty or not (``counts``: those of
    chat completions, per prompt); ``log``: (route, subject, outcome) of every request.
    """

    def __init__(self, faults: list[Fault] | tuple = (), api_key: str | None = None, model: str = "fault-model"):
        self.faults = list(faults)
        self.api_key = api_key
        self.model = model
        self.route_counts: dict[str, Counter[str]] = {}
        self.log: list[tuple[str, str, str]] = []
        self._routes: dict[tuple[str, str], tuple[Handler, Callable[[Request], str]]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.route("POST", CHAT, chat_completion, chat_subject)
        self.route("GET", "/v1/models", lambda r: Reply(200, {"object": "list", "data": [
            {"id": self.model, "object": "model", "created": 0, "owned_by": "faultserver"}]}))
        self._http = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._http.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._http.server_address[1]}/v1"
        self._thread = threading.Thread(target=self._http.serve_forever, args=(0.05,), daemon=True)

    def route(self, method: str, path: str, handler: Handler,
              subject: Callable[[Request], str] = lambda r: r.body.decode("utf-8", "replace")) -> None:
        """Serve ``handler`` at ``method path`` (``{name}`` parts match one path segment);
        ``subject`` says what faults match and counts count."""
        self._routes[(method, path)] = (handler, subject)

    def _resolve(self, request: Request) -> str | None:
        """The route (a path or a template) serving the request; fills ``request.params``."""
        if (request.method, request.path) in self._routes:
            return request.path
        for method, template in self._routes:
            if method == request.method and "{" in template:
                pattern = re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^/]+)", re.escape(template))
                found = re.fullmatch(pattern, request.path)
                if found:
                    request.params = found.groupdict()
                    return template
        return None

    @property
    def counts(self) -> Counter[str]:
        """Chat-completion requests received per prompt (faulty or not)."""
        return self.route_counts.get(CHAT, Counter())

    def add(self, *faults: Fault) -> None:
        """Append faults to the plan."""
        with self._lock:
            self.faults.extend(faults)

    def clear(self) -> None:
        """Remove every fault (the counts stay)."""
        with self._lock:
            self.faults.clear()

    def __enter__(self) -> "FaultServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()  # wakes hanging handlers
        self._http.shutdown()
        self._http.server_close()

    def _pick(self, route: str, subject: str) -> Fault | None:
        with self._lock:
            return next((f for f in self.faults if f.takes(route, subject)), None)

    def _serve(self, request: Request) -> Reply | None:
        """The reply to a request, or None to drop the connection."""
        path = self._resolve(request)
        if path is None:
            return Reply(404, {"error": {"message": f"no route {request.method} {request.path}"}})
        handler, subject_of = self._routes[(request.method, path)]
        subject = subject_of(request)
        with self._lock:
            self.route_counts.setdefault(path, Counter())[subject] += 1
        auth = request.headers.get("authorization", "")
        if self.api_key is not None and auth != f"Bearer {self.api_key}":
            self._note(path, subject, "401")
            return Reply(401, {"error": {"message": f"Incorrect API key provided: {auth.removeprefix('Bearer ')}"}})
        fault = self._pick(path, subject)
        self._note(path, subject, fault.kind if fault else "ok")
        if fault is None:
            return handler(request)
        if fault.kind == "status":
            return Reply(fault.status, {"error": {"message": fault.message, "type": "injected", "code": fault.code}},
                         fault.headers)
        if fault.kind == "hang":
            self._stop.wait(fault.seconds)
            return Reply(504, {"error": {"message": "hung"}})
        if fault.kind == "drop":
            return None
        if fault.kind == "malformed":
            return Reply(200, b'{"id": "chatcmpl-fault", "object": "chat.completion", "choices": [{"index": 0, "mes')
        if fault.kind == "wrong_shape":
            return Reply(200, {"status": "ok", "detail": "not a completion"})
        return _without_logprobs(handler(request))  # no_logprobs

    def _note(self, route: str, subject: str, outcome: str) -> None:
        with self._lock:
            self.log.append((route, subject, outcome))

    def _handler_class(self):
        server = self

        class _Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _handle(self, method: str) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                request = Request(method, self.path.split("?")[0], {k.lower(): v for k, v in self.headers.items()},
                                  self.rfile.read(length) if length else b"")
                reply = server._serve(request)
                if reply is None:  # drop: close the socket without a byte of response
                    self.close_connection = True
                    try:
                        self.connection.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                    return
                data = reply.body if isinstance(reply.body, bytes) else json.dumps(reply.body).encode()
                try:
                    self.send_response(reply.status)
                    for name, value in reply.headers.items():
                        self.send_header(name, value)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:  # the client timed out and left
                    self.close_connection = True

            def do_GET(self):  # noqa: N802
                self._handle("GET")

            def do_POST(self):  # noqa: N802
                self._handle("POST")

            def log_message(self, *args):
                pass

        return _Handler


# ----------------------------------------------------------------------------- the fine-tuning API

FILES = "/v1/files"
FILE = "/v1/files/{id}"
JOBS = "/v1/fine_tuning/jobs"
JOB = "/v1/fine_tuning/jobs/{id}"
EVENTS = "/v1/fine_tuning/jobs/{id}/events"
CANCEL = "/v1/fine_tuning/jobs/{id}/cancel"
PROGRESS = ("validating_files", "queued", "running", "succeeded")  # one step per poll
TERMINAL = ("succeeded", "failed", "cancelled")


def _invalid(message: str, param: str | None = None, status: int = 400) -> Reply:
    return Reply(status, {"error": {"message": message, "type": "invalid_request_error", "param": param,
                                    "code": None}})


def _multipart(request: Request) -> dict[str, tuple[str | None, bytes]]:
    """A multipart/form-data body's fields: name -> (file name, bytes)."""
    head = f"Content-Type: {request.headers.get('content-type', '')}\r\n\r\n".encode()
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + request.body)
    if not message.is_multipart():
        return {}
    return {part.get_param("name", header="content-disposition"): (part.get_filename(), part.get_payload(decode=True))
            for part in message.iter_parts()}


def training_file_problem(data: bytes) -> str | None:
    """Why ``data`` is no fine-tuning file (JSONL of chat ``messages``), or None."""
    try:
        lines = data.decode("utf-8").splitlines()
    except UnicodeDecodeError:
        return "the file is not UTF-8"
    examples = 0
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            return f"line {number}: not valid JSON"
        messages = record.get("messages") if isinstance(record, dict) else None
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
                and isinstance(m.get("content"), str) for m in messages):
            return f"line {number}: expected a 'messages' list of {{role, content}} objects"
        examples += 1
    return None if examples else "the file holds no examples"


class FineTuneAPI:
    """The OpenAI fine-tuning API on a :class:`FaultServer`: upload a JSONL file (validated), create
    a job, poll it (each ``GET`` moves it one step along :data:`PROGRESS`; ``fine_tuned_model`` and
    ``trained_tokens`` are set when it succeeds), list its events, cancel it. ``fail_with``: an
    ``{code, message}`` error that makes every job fail instead of succeeding. ``files`` holds the
    uploaded bytes, ``jobs`` the job objects, ``created`` the create requests' bodies."""

    def __init__(self, server: FaultServer, fail_with: dict | None = None, tokens_per_byte: int = 1):
        self.server, self.fail_with, self.tokens_per_byte = server, fail_with, tokens_per_byte
        self.files: dict[str, bytes] = {}
        self.file_objects: dict[str, dict] = {}
        self.jobs: dict[str, dict] = {}
        self.events: dict[str, list[dict]] = {}
        self.created: list[dict] = []
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        job_id = lambda r: r.params.get("id", "")  # noqa: E731
        server.route("POST", FILES, self.upload, lambda r: "upload")
        server.route("GET", FILE, self.file, job_id)
        server.route("POST", JOBS, self.create, lambda r: "create")
        server.route("GET", JOB, self.poll, job_id)
        server.route("GET", EVENTS, self.list_events, job_id)
        server.route("POST", CANCEL, self.cancel, job_id)

    def _id(self, prefix: str) -> str:
        return f"{prefix}-{next(self._ids):06d}{hashlib.sha256(prefix.encode()).hexdigest()[:18]}"

    def _event(self, job_id: str, message: str, level: str = "info") -> None:
        self.events[job_id].append({"object": "fine_tuning.job.event", "id": self._id("ftevent"),
                                    "created_at": len(self.events[job_id]) + 1, "level": level,
                                    "message": message, "data": {}, "type": "message"})

    def upload(self, request: Request) -> Reply:
        fields = _multipart(request)
        purpose = fields.get("purpose", (None, b""))[1].decode()
        if purpose != "fine-tune":
            return _invalid(f"purpose: expected 'fine-tune', got {purpose!r}", "purpose")
        if "file" not in fields:
            return _invalid("file: missing", "file")
        name, data = fields["file"]
        problem = training_file_problem(data)
        if problem:
            return _invalid(f"Invalid file format for Fine-Tuning API: {problem}", "file")
        with self._lock:
            file_id = self._id("file")
            self.files[file_id] = data
            self.file_objects[file_id] = {"id": file_id, "object": "file", "bytes": len(data), "created_at": 1,
                                          "filename": name or "upload.jsonl", "purpose": "fine-tune",
                                          "status": "processed", "expires_at": None, "status_details": None}
        return Reply(200, self.file_objects[file_id])

    def file(self, request: Request) -> Reply:
        found = self.file_objects.get(request.params["id"])
        return Reply(200, found) if found else _invalid(f"No such File object: {request.params['id']}", "id", 404)

    def create(self, request: Request) -> Reply:
        body = request.json()
        if not body.get("model"):
            return _invalid("model: missing", "model")
        if body.get("training_file") not in self.files:
            return _invalid(f"invalid training_file: {body.get('training_file')}", "training_file")
        supervised = (body.get("method") or {}).get("supervised") or {}
        chosen = {**(body.get("hyperparameters") or {}), **(supervised.get("hyperparameters") or {})}
        hyper = {k: chosen.get(k, "auto") for k in ("n_epochs", "batch_size", "learning_rate_multiplier")}
        with self._lock:
            self.created.append(body)
            job_id = self._id("ftjob")
            self.jobs[job_id] = {
                "object": "fine_tuning.job", "id": job_id, "model": body["model"], "created_at": 1000 + len(self.jobs),
                "finished_at": None, "fine_tuned_model": None, "organization_id": "org-faultserver",
                "result_files": [], "status": PROGRESS[0], "validation_file": body.get("validation_file"),
                "training_file": body["training_file"], "hyperparameters": hyper, "trained_tokens": None,
                "error": None, "user_provided_suffix": body.get("suffix"), "seed": body.get("seed") or 42,
                "estimated_finish": None, "integrations": [], "metadata": body.get("metadata"),
                "method": {"type": "supervised", "supervised": {"hyperparameters": hyper}}}
            self.events[job_id] = []
            self._event(job_id, "Validating training file")
        return Reply(200, self.jobs[job_id])

    def _missing(self, request: Request) -> Reply | None:
        if request.params["id"] not in self.jobs:
            return _invalid(f"Could not find fine-tune: {request.params['id']}", "id", 404)
        return None

    def poll(self, request: Request) -> Reply:
        missing = self._missing(request)
        if missing:
            return missing
        with self._lock:
            job = self.jobs[request.params["id"]]
            if job["status"] not in TERMINAL:
                self._advance(job)
            return Reply(200, json.loads(json.dumps(job)))

    def _advance(self, job: dict) -> None:
        step = PROGRESS[PROGRESS.index(job["status"]) + 1]
        if step == "succeeded" and self.fail_with:
            job.update(status="failed", finished_at=job["created_at"] + 60,
                       error={"param": None, **self.fail_with})
            self._event(job["id"], f"Fine-tuning job failed: {self.fail_with.get('message')}", "error")
            return
        job["status"] = step
        if step == "succeeded":
            epochs = job["hyperparameters"]["n_epochs"]
            tokens = self.tokens_per_byte * len(self.files[job["training_file"]]) * (epochs if epochs != "auto" else 1)
            suffix = job["user_provided_suffix"] or ""
            job.update(finished_at=job["created_at"] + 60, trained_tokens=tokens,
                       fine_tuned_model=f"ft:{job['model']}:faultserver:{suffix}:{job['id'][-8:]}")
        self._event(job["id"], f"Job is {step}")

    def list_events(self, request: Request) -> Reply:
        missing = self._missing(request)
        if missing:
            return missing
        data = list(reversed(self.events[request.params["id"]]))  # newest first, as the API lists them
        return Reply(200, {"object": "list", "data": data, "has_more": False})

    def cancel(self, request: Request) -> Reply:
        missing = self._missing(request)
        if missing:
            return missing
        with self._lock:
            job = self.jobs[request.params["id"]]
            if job["status"] in TERMINAL:
                return _invalid(f"Job has already completed: {job['status']}", "id")
            job["status"] = "cancelled"
            self._event(job["id"], "Job was cancelled")
            return Reply(200, json.loads(json.dumps(job)))
