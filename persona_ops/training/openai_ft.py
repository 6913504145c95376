"""Supervised fine-tuning through the OpenAI fine-tuning API, and a ``dummy`` backend for dry runs.

:func:`fine_tune` (or :func:`train_with_openai` / :func:`train_with_dummy`) takes a chat JSONL
dataset (validated with :func:`persona_ops.data.load_chat_dataset`), an output directory and an
:class:`OpenAIFineTuneCfg`. The ``openai`` backend uploads the file unchanged
(``files.create(purpose="fine-tune")``), creates a job (``fine_tuning.jobs.create`` with the
hyperparameters under ``method.supervised``, the API's current form of the deprecated top-level
``hyperparameters``), polls it with a growing interval until it succeeds, fails or is cancelled,
and returns the fine-tuned model's name. Every request goes through
:class:`persona_ops.inference.openai_client.OpenAIEndpoint` (key from an environment variable,
never shown; retries with backoff honouring ``Retry-After``; :class:`~persona_ops.errors.TransientError`
vs :class:`~persona_ops.errors.ServiceError`). A failed or cancelled job is a ``ServiceError``
carrying the job's ``error``; polling past ``max_wait`` is a ``TransientError`` (a rerun resumes).

Output layout (``out_dir``)::

    job.json      state: the inputs' fingerprint, the uploaded file id, the job id (written atomically
                  as soon as each is known, so a rerun after a crash neither uploads nor creates again
                  and resumes polling the same job)
    result.json   job id, fine-tuned model, status, trained tokens, dataset sha256, timings
    events.jsonl  the job's events, oldest first (``openai`` backend)

The fingerprint is the sha256 of the dataset's sha256 and every setting that shapes the job (base
URL, model, hyperparameters, seed, suffix); ``job.json`` made for another fingerprint is refused.
A rerun whose ``result.json`` matches returns it without a request. One gap: a job whose create
request reached the service but whose reply was lost (a dropped connection, then a retry) may be
created twice; the job carries the fingerprint in its ``metadata`` to find such twins.

The paid service cannot be reached from the test machines: the tests run the real ``openai``
client against a local server implementing these endpoints (``tests/faultserver.py``).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Literal

import openai
from pydantic import BaseModel, ConfigDict, Field

from persona_ops.data import load_chat_dataset
from persona_ops.errors import InputError, ServiceError, TransientError
from persona_ops.inference.backends import EndpointCfg
from persona_ops.inference.openai_client import OpenAIEndpoint, redact
from persona_ops.io import read_json, sha256_text, write_json, write_jsonl

TERMINAL = ("succeeded", "failed", "cancelled")
STATE, RESULT, EVENTS = "job.json", "result.json", "events.jsonl"
Auto = Literal["auto"]


class OpenAIFineTuneCfg(BaseModel):
    """A fine-tuning job: where (``endpoint``; its ``model`` is unused), what (``model``: the base
    model), how (hyperparameters, ``"auto"``: the service chooses), and how long to wait."""

    model_config = ConfigDict(extra="forbid")
    backend: Literal["openai", "dummy"] = "openai"
    endpoint: EndpointCfg = Field(default_factory=EndpointCfg)
    model: str = Field(min_length=1)  # the base model, e.g. gpt-4.1-mini-2025-04-14
    n_epochs: int | Auto = Field("auto", ge=1)
    learning_rate_multiplier: float | Auto = Field("auto", gt=0)
    batch_size: int | Auto = Field("auto", ge=1)
    seed: int = Field(0, ge=0)
    suffix: str | None = Field(None, min_length=1, max_length=64)  # part of the fine-tuned model's name
    poll_interval: float = Field(10.0, gt=0)  # seconds before the first poll, then x1.5 ...
    poll_interval_max: float = Field(120.0, gt=0)  # ... up to this
    max_wait: float = Field(24 * 3600.0, gt=0)  # seconds of polling per call before a TransientError

    def hyperparameters(self) -> dict[str, Any]:
        return {"n_epochs": self.n_epochs, "learning_rate_multiplier": self.learning_rate_multiplier,
                "batch_size": self.batch_size}


class FineTuneResult(BaseModel):
    """What a finished job made (``result.json``)."""

    backend: str
    job_id: str
    file_id: str | None
    fine_tuned_model: str
    status: str
    trained_tokens: int | None
    base_model: str
    dataset_sha256: str
    fingerprint: str
    created_at: int | None  # the service's clock (Unix seconds)
    finished_at: int | None
    waited_s: float  # this call's time, from start to result
    resumed: bool  # whether the job was created by an earlier call


def fingerprint(dataset_sha256: str, cfg: OpenAIFineTuneCfg) -> str:
    """The sha256 naming one job: the dataset and every setting that shapes the job."""
    shaping = {"dataset": dataset_sha256, "backend": cfg.backend, "base_url": cfg.endpoint.base_url,
               "model": cfg.model, "seed": cfg.seed, "suffix": cfg.suffix, **cfg.hyperparameters()}
    return sha256_text(json.dumps(shaping, sort_keys=True))


def fine_tune(dataset_path: str | os.PathLike, out_dir: str | os.PathLike, cfg: OpenAIFineTuneCfg,
              on_poll: Callable[[dict], None] | None = None) -> FineTuneResult:
    """Fine-tune with ``cfg.backend`` (see :func:`train_with_openai`, :func:`train_with_dummy`)."""
    if cfg.backend == "dummy":
        return train_with_dummy(dataset_path, out_dir, cfg)
    return train_with_openai(dataset_path, out_dir, cfg, on_poll)


# ----------------------------------------------------------------------------- state


class _Run:
    """One call's inputs and the state file beside the output."""

    def __init__(self, dataset_path, out_dir, cfg: OpenAIFineTuneCfg):
        self.dataset_path, self.out_dir, self.cfg = Path(dataset_path), Path(out_dir), cfg
        load_chat_dataset(self.dataset_path)  # bad input fails here, before any request
        self.data = self.dataset_path.read_bytes()  # the bytes hashed are the bytes uploaded
        self.dataset_sha256 = hashlib.sha256(self.data).hexdigest()
        self.fingerprint = fingerprint(self.dataset_sha256, cfg)
        self.started = time.monotonic()
        self.state = self._load_state()
        self.resumed = bool(self.state.get("job_id"))

    def _load_state(self) -> dict:
        path = self.out_dir / STATE
        if not path.exists():
            return {"fingerprint": self.fingerprint, "dataset_sha256": self.dataset_sha256,
                    "backend": self.cfg.backend, "base_model": self.cfg.model, "file_id": None, "job_id": None}
        state = read_json(path)
        found = state.get("fingerprint") if isinstance(state, dict) else None
        if found != self.fingerprint:
            raise InputError(f"{path}: fingerprint: expected {self.fingerprint} (this dataset and these settings), "
                             f"found {found}: the directory belongs to another job; use another output directory "
                             "or delete it")
        return state

    def save(self, **changes) -> None:
        self.state.update(changes)
        write_json(self.out_dir / STATE, self.state)

    def finished(self) -> FineTuneResult | None:
        """The result of an earlier call with the same inputs, if there is one."""
        path = self.out_dir / RESULT
        if path.exists():
            result = read_json(path)
            if isinstance(result, dict) and result.get("fingerprint") == self.fingerprint:
                return FineTuneResult(**result)
        return None

    def write_result(self, job_id: str, model: str, status: str, tokens: int | None, created_at: int | None,
                     finished_at: int | None) -> FineTuneResult:
        result = FineTuneResult(
            backend=self.cfg.backend, job_id=job_id, file_id=self.state.get("file_id"), fine_tuned_model=model,
            status=status, trained_tokens=tokens, base_model=self.cfg.model, dataset_sha256=self.dataset_sha256,
            fingerprint=self.fingerprint, created_at=created_at, finished_at=finished_at,
            waited_s=round(time.monotonic() - self.started, 3), resumed=self.resumed)
        write_json(self.out_dir / RESULT, result.model_dump())
        return result


# ----------------------------------------------------------------------------- the openai backend


def _endpoint(cfg: OpenAIFineTuneCfg) -> OpenAIEndpoint:
    e = cfg.endpoint
    return OpenAIEndpoint("fine-tuning", cfg.model, base_url=e.base_url, api_key_env=e.api_key_env, max_concurrency=1,
                          max_retries=e.max_retries, timeout=e.timeout, backoff_base=e.backoff_base,
                          backoff_max=e.backoff_max)


def _request(endpoint: OpenAIEndpoint, step: str, call: Callable[[openai.AsyncOpenAI], Any]) -> Any:
    """One API call with the endpoint's retries; a failure says which step failed."""
    async def one(client, _):
        return await call(client)

    try:
        return endpoint.map(one, [None])[0]
    except (TransientError, ServiceError) as e:
        raise type(e)(f"{step}: {e}") from None


def train_with_openai(dataset_path: str | os.PathLike, out_dir: str | os.PathLike, cfg: OpenAIFineTuneCfg,
                      on_poll: Callable[[dict], None] | None = None) -> FineTuneResult:
    """Fine-tune ``cfg.model`` on the chat JSONL at ``dataset_path`` through the OpenAI fine-tuning API;
    write ``job.json``, ``events.jsonl`` and ``result.json`` into ``out_dir`` (see the module docstring).
    Resumable: a rerun with the same inputs reuses the uploaded file and the job, and polls it on.
    ``on_poll(job)`` sees each polled job as a dict. Raises ``InputError`` for a bad dataset or a
    directory of another job, ``ServiceError`` for a failed or cancelled job or a refused request,
    ``TransientError`` for failures a later rerun may cure (network, rate limits, ``max_wait``)."""
    run = _Run(dataset_path, out_dir, cfg)
    done = run.finished()
    if done is not None:
        return done
    endpoint = _endpoint(cfg)
    if not run.state.get("file_id"):
        uploaded = _request(endpoint, "uploading the training file", lambda c: c.files.create(
            file=(run.dataset_path.name, run.data), purpose="fine-tune"))
        run.save(file_id=uploaded.id)
    if not run.state.get("job_id"):
        job = _request(endpoint, "creating the fine-tuning job", lambda c: c.fine_tuning.jobs.create(
            model=cfg.model, training_file=run.state["file_id"], seed=cfg.seed,
            method={"type": "supervised", "supervised": {"hyperparameters": cfg.hyperparameters()}},
            metadata={"persona_ops_fingerprint": run.fingerprint}, **({"suffix": cfg.suffix} if cfg.suffix else {})))
        run.save(job_id=job.id)
    job = _poll(endpoint, run, on_poll)
    events = _request(endpoint, "listing the job's events", lambda c: c.fine_tuning.jobs.list_events(
        run.state["job_id"], limit=100))
    write_jsonl(run.out_dir / EVENTS, [e.model_dump() for e in reversed(events.data)])
    if job.status != "succeeded":
        raise ServiceError(_job_failure(job, run, endpoint))
    return run.write_result(job.id, job.fine_tuned_model, job.status, job.trained_tokens, job.created_at,
                            job.finished_at)


def _poll(endpoint: OpenAIEndpoint, run: _Run, on_poll: Callable[[dict], None] | None):
    """Poll the job until it is terminal (interval x1.5 up to the maximum), at most ``max_wait`` seconds."""
    cfg, job_id = run.cfg, run.state["job_id"]
    interval, deadline = cfg.poll_interval, time.monotonic() + cfg.max_wait
    while True:
        job = _request(endpoint, f"polling job {job_id}", lambda c: c.fine_tuning.jobs.retrieve(job_id))
        if on_poll is not None:
            on_poll(job.model_dump())
        if job.status in TERMINAL:
            return job
        if time.monotonic() + interval > deadline:
            raise TransientError(f"fine-tuning job {job_id} is still {job.status} after {cfg.max_wait:g}s; "
                                 f"rerun to resume polling it (recorded in {run.out_dir / STATE})")
        time.sleep(interval)
        interval = min(cfg.poll_interval_max, interval * 1.5)


def _job_failure(job, run: _Run, endpoint: OpenAIEndpoint) -> str:
    error = job.error
    detail = f"{error.code or 'error'}: {error.message}" if error is not None and error.message else "no error given"
    message = (f"fine-tuning job {job.id} ({run.cfg.model}) {job.status}: {detail}; a rerun reports the same job: "
               f"delete {run.out_dir / STATE} to create a new one")
    return redact(message, os.environ.get(run.cfg.endpoint.api_key_env))


def cancel_job(out_dir: str | os.PathLike, cfg: OpenAIFineTuneCfg) -> str:
    """Cancel the job recorded in ``out_dir/job.json``; return its status afterwards."""
    path = Path(out_dir) / STATE
    job_id = read_json(path).get("job_id")
    if not job_id:
        raise InputError(f"{path}: job_id: expected the id of a created job, found none")
    if cfg.backend == "dummy":
        return "succeeded"
    job = _request(_endpoint(cfg), f"cancelling job {job_id}", lambda c: c.fine_tuning.jobs.cancel(job_id))
    return job.status


# ----------------------------------------------------------------------------- the dummy backend


def train_with_dummy(dataset_path: str | os.PathLike, out_dir: str | os.PathLike,
                     cfg: OpenAIFineTuneCfg) -> FineTuneResult:
    """A dry run of the plumbing: no request, instant; the same validation, ``job.json`` and
    ``result.json`` as :func:`train_with_openai`, with a job id and a model name derived from the
    inputs' fingerprint (the same inputs give the same names)."""
    run = _Run(dataset_path, out_dir, cfg.model_copy(update={"backend": "dummy"}))
    done = run.finished()
    if done is not None:
        return done
    tag = run.fingerprint[:12]
    run.save(file_id=f"file-dummy-{tag}", job_id=f"ftjob-dummy-{tag}")
    model = f"ft:{cfg.model}:dummy:{cfg.suffix or 'persona-ops'}:{tag}"
    return run.write_result(run.state["job_id"], model, "succeeded", 0, None, None)
