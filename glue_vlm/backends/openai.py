"""GPT-4o and any OpenAI-compatible server (vLLM, Ollama, ``transformers serve``).

Each stamp is one chat request: the image as a base64 PNG ``image_url`` part, the
task's prompt, temperature 0. How the answer is constrained depends on what the server
does, found out on the first row (the *probe*) and then used for every row:

1. ``json_schema``: a strict JSON schema whose ``label`` is an enum of the label names,
   with ``logprobs``/``top_logprobs`` turned into one probability per label (see
   :mod:`.openai_logprobs`). OpenAI, vLLM, recent Ollama.
2. ``choice``: vLLM's ``structured_outputs: {"choice": [...]}`` extra field.
3. ``parse``: free text read by :func:`glue_vlm.parsing.parse_answer`; no
   probabilities.

A server may accept a constraint and ignore it (``transformers serve`` does), so a mode
counts as supported only when the answer obeys it. A 400/422 on the probe moves on to
the next mode; a server that ignores logprobs gives labels with unknown confidence.
``Prediction.method`` records per row which path produced the label
(``json_schema+logprobs``, ``json_schema``, ``choice+logprobs``, ``choice``, ``parse``).

Requests run concurrently on a private event loop (``predict`` is a plain blocking
call), shared over one or more base URLs by least-outstanding-requests. 429/5xx,
timeouts and dropped connections are retried with backoff and jitter; Retry-After is
honoured and repeated 429s lower the concurrency (:mod:`.openai_transport`). A key never
appears in an error, a log line or a prediction.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import math
import os
import re
import socket
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence
from urllib.parse import urlparse

from .base import Backend, BackendError, CostEstimate, Prediction, Usage
from .openai_logprobs import label_probabilities
from .openai_transport import (AdaptiveLimit, Redactor, Replica, backoff_delay, pick_replica,
                               retry_after_seconds)

if TYPE_CHECKING:  # pragma: no cover
    from ..stamps import Stamp
    from ..tasks import Task

__all__ = ["OpenAIBackend", "OpenAIStats", "PRICES", "MODES"]

log = logging.getLogger(__name__)

OPENAI_HOST = "api.openai.com"
MODES = ("json_schema", "choice", "parse")
DETAILS = ("low", "high", "auto")
#: longest Retry-After we wait for; a longer one stops the run ("come back later")
MAX_RETRY_AFTER = 120.0
#: how much of a failed response body is kept with the row
RAW_KEEP = 2000
#: free-text answers: room for a sentence or two
PARSE_MAX_TOKENS = 128

#: USD per million tokens (input, output) and image tokens at low detail, by model
#: prefix (longest prefix wins); override with ``prices=``. Checked 2025; prices change.
PRICES: dict[str, dict[str, float]] = {
    "gpt-4o": {"input": 2.50, "output": 10.00, "image_tokens": 85},
    "gpt-4o-mini": {"input": 0.15, "output": 0.60, "image_tokens": 2833},
    "gpt-4.1": {"input": 2.00, "output": 8.00, "image_tokens": 85},
    "gpt-4-turbo": {"input": 10.00, "output": 30.00, "image_tokens": 85},
}
#: image tokens at high detail for a square stamp (768x768: four 512-px tiles)
HIGH_DETAIL_TOKENS = 85 + 4 * 170
LETTER_INSTRUCTION = "Answer with the letter of one option only."


class _RowFailure(Exception):
    """One row cannot be answered; ``status`` is the HTTP status if there was one."""

    def __init__(self, reason: str, raw: str = "", status: int = 0):
        super().__init__(reason)
        self.reason, self.raw, self.status = reason, raw, status


@dataclass
class _Reply:
    content: str
    logprobs: list[dict] | None
    finish_reason: str
    refusal: str
    prompt_tokens: int
    completion_tokens: int


@dataclass
class OpenAIStats:
    """What the engine did, summed over its lifetime (usage as the servers reported it)."""

    requests: int = 0
    retries: int = 0
    rate_limited: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    by_url: dict[str, int] = field(default_factory=dict)


class _LoopThread:
    """A private asyncio loop, so ``predict`` works from any thread (Qt workers,
    notebooks that already run a loop)."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True,
                                       name="glue-vlm-openai")
        self.thread.start()

    def run(self, coro):
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()
            raise

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.loop.close()


class OpenAIBackend(Backend):
    """Chat completions on OpenAI (default ``gpt-4o``) or any compatible server.

    ``base_url``: one URL or a list (replicas serving the same model). ``api_key``:
    else ``OPENAI_API_KEY``; servers without authentication need none. ``backoff``:
    first retry delay in seconds (default ``$GLUE_VLM_OPENAI_BACKOFF`` or 1.0).
    ``batch_api``: send rows through OpenAI's Batch API (half price, up to 24 h; see
    :mod:`.openai_batch`). Each chunk of rows becomes a job; the run waits
    ``batch_wait`` s for it (default 0: submit every job and finish; None: wait until
    each job ends, polling every ``batch_poll`` s) and leaves rows of unfinished jobs
    failed with "run again later": a rerun collects them.
    """

    name = "openai"
    accepts = "png"
    max_stamp_size = 512  # low detail: GPT-4o sees at most 512x512
    gives_probabilities = True

    def __init__(self, model: str = "gpt-4o", base_url: str | list[str] | None = None,
                 api_key: str | None = None, detail: str = "low", concurrency: int = 8,
                 timeout: float = 60.0, max_retries: int = 4, prices: dict | None = None,
                 batch_api: bool = False, batch_size: int | None = None,
                 backoff: float | None = None, max_backoff: float = 30.0,
                 batch_poll: float = 30.0, batch_wait: float | None = 0.0):
        if detail not in DETAILS:
            raise BackendError(f"detail must be one of {', '.join(DETAILS)}, got {detail!r}")
        if int(concurrency) < 1:
            raise BackendError(f"concurrency must be at least 1, got {concurrency}")
        if not timeout or timeout <= 0:
            raise BackendError(f"timeout must be a positive number of seconds, got {timeout}")
        if int(max_retries) < 0:
            raise BackendError(f"max_retries must be 0 or more, got {max_retries}")
        urls = [base_url] if isinstance(base_url, str) else list(base_url or [])
        self.base_urls = list(dict.fromkeys(_clean_url(u) for u in urls)) or [None]
        self.official = all(u is None or urlparse(u).hostname == OPENAI_HOST
                            for u in self.base_urls)
        key = api_key or os.environ.get("OPENAI_API_KEY")
        if not key:
            if self.official:
                raise BackendError("no OpenAI API key: set the OPENAI_API_KEY environment "
                                   "variable")
            key = "none"  # servers without authentication accept any key
        self.__key = key
        self._redact = Redactor(key)
        self.model = model
        self.detail = detail
        self.concurrency = int(concurrency)
        self.timeout = float(timeout)
        self.max_retries = int(max_retries)
        self.prices = prices
        self.batch_api = bool(batch_api)
        self.batch_poll = float(batch_poll)
        self.batch_wait = None if batch_wait is None else float(batch_wait)
        #: where open Batch API jobs are remembered (see ``attach_store``)
        self.batch_store = None
        self.backoff = float(os.environ.get("GLUE_VLM_OPENAI_BACKOFF", 1.0)
                             if backoff is None else backoff)
        self.max_backoff = float(max_backoff)
        if detail != "low":
            self.max_stamp_size = 768
        # Each ``predict`` call ends when its slowest request does; eight rounds of
        # requests per call keep that tail small next to the call. Batch API jobs of
        # 2,000 rows keep the run's look-ahead (4 calls) to ~200 MB of stamps.
        self.batch_size = int(batch_size) if batch_size else (
            2000 if self.batch_api else max(32, 8 * self.concurrency))
        self.stats = OpenAIStats()
        #: the request mode the probe settled on (None until the first good answer)
        self.mode: str | None = None
        self._logprobs = True
        self._fatal: str | None = None
        self._loop: _LoopThread | None = None
        self._replicas: list[Replica] = []
        self._limit: AdaptiveLimit | None = None
        self._probe_lock: asyncio.Lock | None = None

    def __repr__(self) -> str:
        urls = ", ".join(u or OPENAI_HOST for u in self.base_urls)
        return f"OpenAIBackend(model={self.model!r}, servers=[{urls}])"

    # -- protocol ---------------------------------------------------------------------
    def settings(self) -> dict:
        """Store-key settings: what changes answers. Not the key, not the base URLs
        (adding a replica must not invalidate stored answers), not the Batch API (it
        gives the same answers)."""
        return {"backend": self.name, "model": self.model, "detail": self.detail,
                "api": "chat.completions", "temperature": 0,
                "server": "openai" if self.official else "compatible"}

    def attach_store(self, store) -> None:
        """Keep open Batch API jobs in ``store`` (a ``ResultStore``) so that a rerun
        collects them instead of submitting again. The run calls this."""
        self.batch_store = store

    @property
    def usage(self) -> Usage:
        """Token usage summed from the servers' responses so far."""
        return Usage(prompt_tokens=self.stats.prompt_tokens,
                     completion_tokens=self.stats.completion_tokens,
                     calls=self.stats.requests)

    @property
    def concurrency_limit(self) -> int:
        """Requests allowed in flight now (lowered by repeated 429s)."""
        return self._limit.limit if self._limit else self.concurrency

    @property
    def lowest_concurrency(self) -> int:
        return self._limit.lowest if self._limit else self.concurrency

    def estimate_cost(self, n_images: int, task: "Task") -> CostEstimate:
        price = self._price()
        image_tokens = int((price or {}).get("image_tokens", 85))
        if self.detail != "low":
            image_tokens = HIGH_DETAIL_TOKENS
        schema_tokens = 25 + 4 * len(task.labels)
        per_input = image_tokens + math.ceil(len(task.render_prompt()) / 4) + schema_tokens + 10
        per_output = 8 + max(math.ceil(len(name) / 3) for name in task.label_names)
        input_tokens, output_tokens = n_images * per_input, n_images * per_output
        notes = [f"{image_tokens} tokens per {self.detail}-detail image"]
        dollars = None
        if price and "input" in price and "output" in price:
            dollars = (input_tokens * price["input"] + output_tokens * price["output"]) / 1e6
            if self.batch_api:
                dollars /= 2
                notes.append("Batch API: half price")
        elif self.official:
            notes.append(f"no price known for {self.model!r}: pass prices="
                         "{'input': $/1M tokens, 'output': $/1M tokens}")
        else:
            notes.append("self-hosted server: no price")
        return CostEstimate(n_images, input_tokens, output_tokens, dollars, "; ".join(notes))

    def _price(self) -> dict | None:
        if self.prices is not None:
            return self.prices
        if not self.official:
            return None
        matches = [p for p in PRICES if self.model == p or self.model.startswith(p + "-")]
        return PRICES[max(matches, key=len)] if matches else None

    def predict(self, stamps: Sequence["Stamp"], task: "Task") -> list[Prediction]:
        if self._fatal:
            raise BackendError(self._fatal)
        if not stamps:
            return []
        self._start()
        if self.batch_api:
            from .openai_batch import predict_with_batch_api

            return self._loop.run(predict_with_batch_api(self, stamps, task))
        return self._loop.run(self._predict_all(stamps, task))

    def close(self) -> None:
        if self._loop is None:
            return
        clients = [r.client for r in self._replicas]

        async def close_clients():
            for client in clients:
                await client.close()

        try:
            self._loop.run(close_clients())
        finally:
            self._loop.stop()
            self._loop, self._replicas = None, []

    # -- machinery ----------------------------------------------------------------------
    def _start(self) -> None:
        if self._loop is not None:
            return
        import openai

        self._replicas = [Replica(url or f"https://{OPENAI_HOST}/v1",
                                  openai.AsyncOpenAI(api_key=self.__key, base_url=url,
                                                     timeout=self.timeout, max_retries=0))
                          for url in self.base_urls]
        self._loop = _LoopThread()
        self._limit = AdaptiveLimit(self.concurrency)

        async def make_lock():
            return asyncio.Lock()

        self._probe_lock = self._loop.run(make_lock())

    async def _predict_all(self, stamps: Sequence["Stamp"], task: "Task") -> list[Prediction]:
        jobs = [asyncio.ensure_future(self._predict_one(st, task)) for st in stamps]
        try:
            return list(await asyncio.gather(*jobs))
        except BackendError as exc:
            for job in jobs:
                job.cancel()
            await asyncio.gather(*jobs, return_exceptions=True)
            answered = [j.result() if j.done() and not j.cancelled() and j.exception() is None
                        else None for j in jobs]
            if not any(p is not None and p.ok for p in answered):
                raise
            # Keep what was paid for: the run stores these, the next call stops it.
            self._fatal = str(exc)
            return [p if p is not None else Prediction.failed(f"not sent: {exc}")
                    for p in answered]

    async def _predict_one(self, stamp: "Stamp", task: "Task") -> Prediction:
        if stamp.png is None:
            return Prediction.failed("no PNG bytes for this stamp (this engine reads PNG)")
        if self.mode is None:
            async with self._probe_lock:
                if self.mode is None:
                    return await self._probe(stamp, task)
        return await self._ask(stamp, task, self.mode)

    async def _ask(self, stamp: "Stamp", task: "Task", mode: str) -> Prediction:
        try:
            reply = await self._send(self._request(stamp, task, mode))
        except _RowFailure as failure:
            return self._failed(failure, mode)
        return self._judge(reply, task, mode, fallback=True)

    async def _probe(self, stamp: "Stamp", task: "Task") -> Prediction:
        """Try the modes in order on one row until the server obeys one; settle on it."""
        spent = [0, 0]
        failure = None
        for mode in MODES:
            while True:
                try:
                    reply = await self._send(self._request(stamp, task, mode))
                    break
                except _RowFailure as exc:
                    failure = exc
                    if exc.status in (400, 422) and mode != "parse" and self._logprobs \
                            and "logprob" in exc.reason.lower():
                        self._logprobs = False
                        continue
                    reply = None
                    break
            if reply is None:
                if failure.status in (400, 422) and mode != "parse":
                    log.info("server refused %s requests (%s); trying the next mode",
                             mode, failure.reason)
                    continue
                return self._failed(failure, mode)
            spent[0] += reply.prompt_tokens
            spent[1] += reply.completion_tokens
            prediction = self._judge(reply, task, mode, fallback=mode == "parse")
            if prediction is None:
                log.info("server accepted %s but did not apply it; trying the next mode", mode)
                continue
            self.mode = mode
            self.gives_probabilities = prediction.probabilities is not None
            log.info("server answers in mode %s (%s)", mode, prediction.method)
            prediction.prompt_tokens, prediction.completion_tokens = spent
            return prediction
        return self._failed(failure, "parse")

    def _failed(self, failure: _RowFailure, mode: str) -> Prediction:
        return Prediction.failed(self._redact(failure.reason),
                                 raw_text=self._redact(failure.raw[:RAW_KEEP]), method=mode)

    # -- one request ----------------------------------------------------------------------
    def _prompt(self, task: "Task", mode: str) -> str:
        """The task's prompt; constrained modes answer with a label name, not a letter."""
        prompt = task.render_prompt()
        if mode != "parse" and prompt.endswith(LETTER_INSTRUCTION):
            prompt = prompt[:-len(LETTER_INSTRUCTION)] + "Answer with the name of one option."
        return prompt

    def _request(self, stamp: "Stamp", task: "Task", mode: str) -> dict[str, Any]:
        """The JSON body of a chat completion request for one stamp."""
        image = "data:image/png;base64," + base64.b64encode(stamp.png).decode("ascii")
        labels = task.label_names
        request: dict[str, Any] = {
            "model": self.model,
            "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": image, "detail": self.detail}},
                {"type": "text", "text": self._prompt(task, mode)}]}],
            "temperature": 0,
        }
        max_tokens = PARSE_MAX_TOKENS if mode == "parse" else 16 + max(map(len, labels))
        request["max_completion_tokens" if self.official else "max_tokens"] = max_tokens
        if mode == "json_schema":
            request["response_format"] = {"type": "json_schema", "json_schema": {
                "name": "classification", "strict": True, "schema": {
                    "type": "object", "properties": {"label": {"type": "string",
                                                               "enum": labels}},
                    "required": ["label"], "additionalProperties": False}}}
        elif mode == "choice":
            request["structured_outputs"] = {"choice": labels}
        if mode != "parse" and self._logprobs:
            request["logprobs"] = True
            request["top_logprobs"] = min(20, len(labels) + 5)
        return request

    async def _send(self, request: dict[str, Any]) -> _Reply:
        """One answer, retrying what can be retried; raises ``_RowFailure`` for this row
        or ``BackendError`` when nothing can work."""
        import openai

        response_type = _response_type()
        attempt = 0
        while True:
            window = await self._limit.acquire()
            replica = pick_replica(self._replicas)
            replica.outstanding += 1
            replica.sent += 1
            self.stats.requests += 1
            self.stats.by_url[replica.url] = self.stats.by_url.get(replica.url, 0) + 1
            status, text, headers, problem = 0, "", None, ""
            try:
                # The SDK's generic POST: its auth, headers and error mapping, without
                # the per-request parameter transform (milliseconds of CPU per image).
                raw = await replica.client.post("/chat/completions", body=request,
                                                cast_to=response_type)
                replica.failures = 0
                status, text = raw.status_code, raw.text
            except openai.APIStatusError as exc:
                replica.failures = 0
                status, text, headers = exc.status_code, exc.response.text, exc.response.headers
            except openai.APITimeoutError:
                problem = f"no answer within {self.timeout:g} s"
            except openai.APIConnectionError as exc:
                cause = exc.__cause__ or exc
                if _refused(cause):
                    replica.failures += 1
                    problem = f"cannot connect to {replica.url} ({cause})"
                else:
                    problem = f"connection to {replica.url} lost ({type(cause).__name__}: {cause})"
            finally:
                replica.outstanding -= 1
                self._limit.release()

            if 200 <= status < 300:
                self._limit.succeeded()
                return self._read_reply(text)
            delay = None
            if status:
                message = self._redact(_error_message(text))
                self._check_fatal(status, message, text, replica)
                if status == 429:
                    wait = retry_after_seconds(headers)
                    if wait is not None and wait > MAX_RETRY_AFTER:
                        raise BackendError(f"rate limited: {replica.url} asks to wait "
                                           f"{wait:.0f} s; run again later (answers so far "
                                           "are stored)")
                    self.stats.rate_limited += 1
                    self._limit.rate_limited(window, wait)
                    delay = 0.0 if wait else None  # the limit itself waits out Retry-After
                elif status not in (408, 409) and status < 500:
                    raise _RowFailure(f"HTTP {status}: {message}", text, status)
                problem = f"HTTP {status}: {message}"
            if attempt >= self.max_retries:
                if not status and all(r.failures for r in self._replicas) and \
                        problem.startswith("cannot connect"):
                    raise BackendError(self._redact(
                        f"{problem}; is the server running? (gave up after {attempt + 1} "
                        "attempts; answers so far are stored)"))
                raise _RowFailure(self._redact(f"{problem} (gave up after {attempt + 1} "
                                               "attempts)"), text, status)
            if delay is None:
                delay = backoff_delay(attempt, self.backoff, self.max_backoff)
            log.info("retrying in %.2f s: %s", delay, self._redact(problem))
            attempt += 1
            self.stats.retries += 1
            if delay:
                await asyncio.sleep(delay)

    def _check_fatal(self, status: int, message: str, text: str, replica: Replica) -> None:
        where = replica.url
        if status in (401, 403):
            raise BackendError(f"{where} refused the request (HTTP {status}: {message}): "
                               "check your API key (OPENAI_API_KEY) and that it "
                               f"may use model {self.model!r}")
        if status == 404:
            raise BackendError(f"{where} has no model {self.model!r} or no chat endpoint "
                               f"(HTTP 404: {message}): check --model, and --base-url "
                               "(it usually ends in /v1)")
        if status == 429 and "insufficient_quota" in text:
            raise BackendError(f"{where}: quota exhausted (HTTP 429: {message}): check "
                               "your plan and billing")

    def _read_reply(self, text: str) -> _Reply:
        """A chat completion from a 2xx body, or ``_RowFailure`` keeping the body."""
        try:
            data = json.loads(text)
        except ValueError:
            what = ("an HTML page" if text.lstrip()[:1] == "<" else
                    "a body that is not valid JSON (malformed or cut short)")
            raise _RowFailure(f"server sent {what} instead of a chat completion", text) from None
        if not isinstance(data, dict):
            raise _RowFailure("server sent JSON that is not a chat completion", text)
        choices = data.get("choices")
        if not choices or not isinstance(choices, list) or not isinstance(choices[0], dict):
            error = _error_message(text) if "error" in data else ""
            raise _RowFailure("server answered with no choices" +
                              (f": {error}" if error else ""), text)
        choice = choices[0]
        message = choice.get("message") or {}
        usage = data.get("usage") or {}
        reply = _Reply(content=message.get("content") or "",
                       logprobs=(choice.get("logprobs") or {}).get("content") or None,
                       finish_reason=choice.get("finish_reason") or "",
                       refusal=message.get("refusal") or "",
                       prompt_tokens=int(usage.get("prompt_tokens") or 0),
                       completion_tokens=int(usage.get("completion_tokens") or 0))
        self.stats.prompt_tokens += reply.prompt_tokens
        self.stats.completion_tokens += reply.completion_tokens
        return reply

    def _judge(self, reply: _Reply, task: "Task", mode: str,
               fallback: bool) -> Prediction | None:
        """The prediction in ``reply``; None when the server did not apply ``mode`` and
        ``fallback`` is off (else free text is parsed)."""
        tokens = {"prompt_tokens": reply.prompt_tokens,
                  "completion_tokens": reply.completion_tokens}
        content = self._redact(reply.content)
        if reply.refusal:
            return Prediction.failed(f"the model refused: {self._redact(reply.refusal)}",
                                     raw_text=content, method=mode)
        labels = task.label_names
        label = None
        if mode == "json_schema":
            try:
                value = json.loads(reply.content)
            except ValueError:
                value = None
            if isinstance(value, dict) and value.get("label") in labels:
                label = value["label"]
        elif mode == "choice" and reply.content.strip() in labels:
            label = reply.content.strip()
        if label is not None:
            probabilities = None
            if reply.logprobs:
                probabilities = label_probabilities(reply.content, reply.logprobs, labels,
                                                    json_value=mode == "json_schema")
            method = mode + ("+logprobs" if probabilities else "")
            return Prediction(label, probabilities, raw_text=content, method=method, **tokens)
        if not fallback:
            return None
        from ..parsing import parse_answer

        label = parse_answer(reply.content, task)
        if label is None:
            reason = "the answer names none of the labels, or more than one"
            if reply.finish_reason == "length":
                reason += " (cut off at the token limit)"
            return Prediction(None, raw_text=content, error=reason, method="parse", **tokens)
        return Prediction(label, raw_text=content, method="parse", **tokens)


def _response_type() -> type:
    """The HTTP response class the SDK returns undecoded (httpx2, or httpx before it)."""
    try:
        import httpx2
    except ImportError:  # pragma: no cover - older openai SDKs
        import httpx as httpx2
    return httpx2.Response


def _refused(error: BaseException) -> bool:
    """Whether a connection error means nothing answers at that address (as opposed to
    a connection that was made and then dropped)."""
    while error is not None:
        if type(error).__name__ == "ConnectError" or isinstance(
                error, (ConnectionRefusedError, socket.gaierror)):
            return True
        error = error.__cause__ or error.__context__
    return False


def _clean_url(url: str | None) -> str | None:
    if url is None:
        return None
    url = str(url).strip().rstrip("/")
    if not re.match(r"^https?://", url):
        raise BackendError(f"base URL {url!r} must start with http:// or https:// "
                           "(e.g. http://localhost:8000/v1)")
    return url


def _error_message(text: str) -> str:
    """A short, one-line reason from an error body (JSON error, FastAPI detail, HTML)."""
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    if isinstance(data, dict):
        error = data.get("error", data)
        if isinstance(error, dict):
            value = error.get("message") or error.get("detail") or error.get("msg")
        else:
            value = error
        if value is None and "detail" in data:
            value = data["detail"]
        if value is not None:
            text = value if isinstance(value, str) else json.dumps(value)
    text = re.sub(r"<[^>]+>", " ", text)
    text = " ".join(text.split())
    return text[:300] or "(empty body)"
