"""OpenAI's Batch API for large catalogs: half price, answers within 24 hours.

One ``predict`` call becomes one job: the rows' chat requests are written as JSONL
(each line's ``custom_id`` is a hash of its request body), uploaded, submitted, polled
every ``batch_poll`` seconds and collected. The request body is the same as on the
direct path (strict ``json_schema`` enum with logprobs: the Batch API runs on OpenAI,
which applies it); ``Prediction.method`` is prefixed ``batch:``.

Resuming: when the engine has a store (:meth:`OpenAIBackend.attach_store`), submitted
request ids are kept there with their job id until the job is collected. A job still
running after ``batch_wait`` seconds (default 0) leaves its rows failed with "run again
later" and the run goes on to the next chunk, so a large catalog is submitted as many
jobs in one go; a rerun (or one after a crash or Ctrl-C) finds each row's job and
collects it instead of submitting, and paying, again.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Sequence

from .base import BackendError, Prediction
from .openai_transport import backoff_delay

if TYPE_CHECKING:  # pragma: no cover
    from ..stamps import Stamp
    from ..tasks import Task
    from .openai import OpenAIBackend

__all__ = ["predict_with_batch_api", "MODE", "FINAL_STATES"]

log = logging.getLogger(__name__)

MODE = "json_schema"
ENDPOINT = "/v1/chat/completions"
FINAL_STATES = ("completed", "failed", "expired", "cancelled")


def request_id(body: dict) -> str:
    """A request's ``custom_id``: the same body always gets the same id."""
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:40]


async def predict_with_batch_api(backend: "OpenAIBackend", stamps: Sequence["Stamp"],
                                 task: "Task") -> list[Prediction]:
    client = backend._replicas[0].client
    store = backend.batch_store
    answers: dict[int, Prediction] = {}
    bodies: dict[str, dict] = {}
    ids: list[str | None] = []
    for position, stamp in enumerate(stamps):
        if stamp.png is None:
            answers[position] = Prediction.failed("no PNG bytes for this stamp")
            ids.append(None)
            continue
        body = backend._request(stamp, task, MODE)
        ids.append(request_id(body))
        bodies[ids[-1]] = body
    jobs = store.open_batches(list(bodies)) if store is not None else {}
    new = {rid: body for rid, body in bodies.items() if rid not in jobs}
    if new:
        batch_id = await _submit(backend, client, new)
        jobs.update(dict.fromkeys(new, batch_id))
        if store is not None:
            store.add_batch(batch_id, list(new))
    results: dict[str, Prediction] = {}
    for batch_id in sorted(set(jobs.values())):
        results.update(await _finish(backend, client, batch_id, task,
                                     [rid for rid, job in jobs.items() if job == batch_id]))
    for position, rid in enumerate(ids):
        if rid is not None:
            answers[position] = results[rid]
    return [answers[i] for i in range(len(stamps))]


async def _submit(backend: "OpenAIBackend", client, bodies: dict[str, dict]) -> str:
    lines = [json.dumps({"custom_id": rid, "method": "POST", "url": ENDPOINT, "body": body})
             for rid, body in bodies.items()]
    data = ("\n".join(lines) + "\n").encode()
    upload = await _call(backend, lambda: client.files.create(
        file=("glue-vlm-batch.jsonl", data, "application/jsonl"), purpose="batch"))
    batch = await _call(backend, lambda: client.batches.create(
        input_file_id=upload.id, endpoint=ENDPOINT, completion_window="24h",
        metadata={"source": "glue-vlm"}))
    log.info("submitted Batch API job %s with %d requests", batch.id, len(lines))
    return batch.id


async def _finish(backend: "OpenAIBackend", client, batch_id: str, task: "Task",
                  rids: list[str]) -> dict[str, Prediction]:
    """Answers for ``rids`` from job ``batch_id``: collected, failed or still pending."""
    loop = asyncio.get_running_loop()
    deadline = None if backend.batch_wait is None else loop.time() + backend.batch_wait
    while True:
        batch = await _call(backend, lambda: client.batches.retrieve(batch_id))
        if batch.status in FINAL_STATES:
            break
        counts = batch.request_counts
        progress = f"{counts.completed}/{counts.total} done" if counts else "queued"
        if deadline is not None and loop.time() >= deadline:
            return {rid: Prediction.failed(
                f"waiting for Batch API job {batch_id} ({batch.status}, {progress}): run "
                "again later to collect it", method="batch") for rid in rids}
        log.info("Batch API job %s: %s, %s", batch_id, batch.status, progress)
        await asyncio.sleep(backend.batch_poll)
    found: dict[str, Prediction] = {}
    for file_id in (batch.output_file_id, batch.error_file_id):
        if file_id:
            content = await _call(backend, lambda: client.files.content(file_id))
            found.update(_read_results(backend, content.text, task))
    why = f"Batch API job {batch_id} ended {batch.status}"
    errors = getattr(batch.errors, "data", None) or []
    if errors:
        why += ": " + "; ".join(str(e.message) for e in errors[:3])
    if backend.batch_store is not None:
        backend.batch_store.forget_batch(batch_id)
    return {rid: found.get(rid) or Prediction.failed(backend._redact(why) +
                                                     " without answering this row",
                                                     method="batch")
            for rid in rids}


def _read_results(backend: "OpenAIBackend", text: str, task: "Task") -> dict[str, Prediction]:
    """custom_id -> prediction from a job's output or error JSONL."""
    from .openai import _RowFailure, _error_message

    out: dict[str, Prediction] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            rid = record["custom_id"]
        except (ValueError, KeyError, TypeError):
            continue
        response = record.get("response") or {}
        status = int(response.get("status_code") or 0)
        raw = json.dumps(response.get("body"))
        if status == 200:
            try:
                prediction = backend._judge(backend._read_reply(raw), task, MODE, fallback=True)
            except _RowFailure as failure:
                prediction = backend._failed(failure, MODE)
        else:
            reason = _error_message(raw) if status else json.dumps(record.get("error"))
            prediction = Prediction.failed(backend._redact(f"HTTP {status}: {reason}"),
                                           raw_text=backend._redact(raw[:2000]), method=MODE)
        prediction.method = "batch:" + prediction.method
        out[rid] = prediction
    return out


async def _call(backend: "OpenAIBackend", make: Callable[[], Awaitable[Any]]) -> Any:
    """One Batch API management call, retried like a chat request; errors that retrying
    cannot fix stop the run."""
    import openai

    for attempt in range(backend.max_retries + 1):
        try:
            return await make()
        except openai.APIStatusError as exc:
            message = backend._redact(_message(exc))
            backend._check_fatal(exc.status_code, message, exc.response.text,
                                 backend._replicas[0])
            if exc.status_code not in (408, 409, 429) and exc.status_code < 500:
                raise BackendError(f"Batch API refused the request (HTTP "
                                   f"{exc.status_code}: {message})") from None
            problem = f"HTTP {exc.status_code}: {message}"
        except openai.APIConnectionError as exc:
            problem = f"cannot reach {backend._replicas[0].url} ({exc.__cause__ or exc})"
        if attempt < backend.max_retries:
            await asyncio.sleep(backoff_delay(attempt, backend.backoff, backend.max_backoff))
    raise BackendError(backend._redact(f"Batch API: {problem} (gave up after "
                                       f"{backend.max_retries + 1} attempts; submitted "
                                       "jobs are kept in the store: run again)"))


def _message(exc) -> str:
    from .openai import _error_message

    return _error_message(exc.response.text)
