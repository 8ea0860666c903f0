"""An OpenAI-compatible server on localhost that records requests and injects faults.

Stdlib only (``http.server.ThreadingHTTPServer``, one thread per connection, HTTP/1.1
keep-alive). It answers ``POST /v1/chat/completions`` from the image it is sent: the
label and its probability come from ``answer(pixels, labels)`` (by default
:func:`default_answer`, a function of the stamp's mean colour, so a test knows what to
expect). It can behave like different real servers:

- ``json_schema``: ``"apply"`` (OpenAI, vLLM), ``"ignore"`` (``transformers serve``:
  accepted, free text comes back) or ``"reject"`` (HTTP 400);
- ``choice`` (vLLM's ``structured_outputs``/``guided_choice`` extra fields):
  ``"apply"``, ``"ignore"`` or ``"reject"`` (HTTP 422, as ``transformers serve`` does);
- ``logprobs``: whether ``logprobs``/``top_logprobs`` are honoured. Answers are split
  into tokens of at most ``token_chars`` characters and each token's ``top_logprobs``
  are exact conditional probabilities under the answer's distribution, so a client
  that maps logprobs to label probabilities can be checked exactly.

Faults (:meth:`OpenAITestServer.inject`) hit the next matching requests: see
:data:`FAULTS`. The Files and Batches endpoints (``/v1/files``, ``/v1/batches``)
process an uploaded JSONL batch when it is submitted.

:func:`serve_transformers` runs the real ``transformers serve`` on a local model
directory, offline, for tests that need a real server.

Command line (for trying a client by hand)::

    python -m glue_vlm.testing.openai_server --port 8001 --latency 0.2
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import math
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from dataclasses import dataclass
from email.parser import BytesParser
from email.policy import HTTP
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

__all__ = ["FAULTS", "Fault", "OpenAITestServer", "RecordedRequest", "default_answer",
           "image_digest", "free_port", "serve_transformers"]

DEFAULT_MODEL = "test-vlm"

#: fault name -> what the server does instead of answering
FAULTS = {
    "rate_limit": "429 with Retry-After (seconds or HTTP-date, from `retry_after`)",
    "server_error": "500 with a JSON error body",
    "bad_gateway_html": "502 with an HTML page",
    "timeout": "waits `delay` seconds before answering (longer than the client waits)",
    "drop": "closes the connection without a response",
    "unauthorized": "401 whose message echoes the key it was sent",
    "forbidden": "403",
    "bad_request": "400: the image cannot be read",
    "model_not_found": "404: the model does not exist",
    "insufficient_quota": "429 with code insufficient_quota",
    "malformed": "200 with a body that is not JSON",
    "truncated": "200 with a JSON body cut short",
    "empty_choices": "200 with an empty `choices` list",
    "html": "200 with an HTML page",
}

AnswerFunction = Callable[[np.ndarray, list[str]], dict[str, float]]


def default_answer(pixels: np.ndarray, labels: list[str]) -> dict[str, float]:
    """The server's belief about a stamp: the label at index ``round(mean red) % n``
    gets ``0.55 + 0.4 * mean green / 255``, the others share the rest equally."""
    n = len(labels)
    chosen = int(round(float(pixels[..., 0].mean()))) % n
    top = 0.55 + 0.4 * float(pixels[..., 1].mean()) / 255.0
    return {lab: top if i == chosen else (1.0 - top) / (n - 1) for i, lab in enumerate(labels)}


def image_digest(png: bytes) -> str:
    """How faults and records name an image: SHA-256 of its PNG bytes."""
    return hashlib.sha256(png).hexdigest()


@dataclass
class Fault:
    kind: str
    #: how many requests it hits; None: every matching request
    times: int | None = 1
    #: only requests carrying this image (see :func:`image_digest`)
    image: str | None = None
    #: Retry-After header value for ``rate_limit``
    retry_after: str | None = None
    #: seconds to wait for ``timeout``
    delay: float = 5.0


@dataclass
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]  # names lower-cased
    body: Any  # parsed JSON, or raw bytes when the body is not JSON
    started: float
    in_flight: int  # chat requests in flight when this one arrived, itself included
    fault: str | None = None
    status: int = 0
    image: str | None = None  # digest of the image sent, if any
    finished: float = 0.0


@dataclass
class _Answer:
    content: str
    tokens: list[tuple[str, list[tuple[str, float]]]]  # (token, top alternatives)
    prompt_tokens: int


class OpenAITestServer:
    """Use as a context manager; ``base_url`` is ``http://127.0.0.1:PORT/v1``."""

    def __init__(self, *, latency: float = 0.0, json_schema: str = "apply",
                 choice: str = "apply", logprobs: bool = True, api_key: str | None = None,
                 model: str = DEFAULT_MODEL, labels: list[str] | None = None,
                 answer: AnswerFunction = default_answer,
                 text_template: str = "The answer is {key}: {label}.",
                 token_chars: int = 4, merge_quote: bool = False, batch_delay: float = 0.0,
                 host: str = "127.0.0.1", port: int = 0):
        for name, value in (("json_schema", json_schema), ("choice", choice)):
            if value not in ("apply", "ignore", "reject"):
                raise ValueError(f"{name} must be apply, ignore or reject, got {value!r}")
        self.latency = latency
        self.json_schema = json_schema
        self.choice = choice
        self.logprobs = logprobs
        self.api_key = api_key
        self.model = model
        self.labels = labels
        self.answer = answer
        self.text_template = text_template
        self.token_chars = token_chars
        #: GPT-style tokenisation where the opening quote and the first characters of
        #: the label share one token (``":"lsbg``)
        self.merge_quote = merge_quote
        #: seconds a submitted batch stays ``in_progress``
        self.batch_delay = batch_delay
        self._address = (host, port)
        self._lock = threading.Lock()
        self._faults: list[Fault] = []
        self._requests: list[RecordedRequest] = []
        self._in_flight = 0
        self.max_in_flight = 0
        self.files: dict[str, dict] = {}
        self.batches: dict[str, dict] = {}
        self.batch_started: dict[str, float] = {}
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle --------------------------------------------------------------------
    def start(self) -> "OpenAITestServer":
        httpd = _QuietServer(self._address, _Handler)
        httpd.owner = self  # type: ignore[attr-defined]
        self._httpd = httpd
        self._thread = threading.Thread(target=httpd.serve_forever, name="openai-test-server",
                                        kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._thread.join()
            self._httpd = None

    def __enter__(self) -> "OpenAITestServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    # -- faults and records -------------------------------------------------------------
    def inject(self, kind: str, times: int | None = 1, *, image: bytes | str | None = None,
               retry_after: str | float | None = None, delay: float = 5.0) -> None:
        """Make the next ``times`` chat requests (carrying ``image``, if given: PNG bytes
        or digest) fail with ``kind`` (one of :data:`FAULTS`)."""
        if kind not in FAULTS:
            raise ValueError(f"unknown fault {kind!r}; use one of {', '.join(FAULTS)}")
        if isinstance(image, bytes):
            image = image_digest(image)
        with self._lock:
            self._faults.append(Fault(kind, times, image,
                                      None if retry_after is None else str(retry_after), delay))

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    def chat_requests(self) -> list[RecordedRequest]:
        return [r for r in self.requests if r.path.endswith("/chat/completions")]

    def reset(self) -> None:
        """Forget recorded requests (faults stay)."""
        with self._lock:
            self._requests.clear()
            self.max_in_flight = 0

    def _take_fault(self, image: str | None) -> Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.image is not None and fault.image != image:
                    continue
                if fault.times is not None:
                    fault.times -= 1
                    if fault.times <= 0:
                        self._faults.remove(fault)
                return fault
        return None

    def _record(self, record: RecordedRequest) -> None:
        with self._lock:
            self._requests.append(record)

    def _enter(self) -> int:
        with self._lock:
            self._in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self._in_flight)
            return self._in_flight

    def _leave(self) -> None:
        with self._lock:
            self._in_flight -= 1

    # -- answering ----------------------------------------------------------------------
    def _labels_from_prompt(self, prompt: str) -> tuple[list[str], list[str]]:
        """(option keys, label names) from a rendered ``Options:`` list."""
        found = re.findall(r"^([A-Z])\. ([^:\n]+)", prompt, flags=re.M)
        return [k for k, _ in found], [name.strip() for _, name in found]

    def compose(self, body: dict) -> tuple[int, dict]:
        """(status, JSON) for a chat request without a fault."""
        if body.get("model") != self.model:
            return 404, _error(f"The model `{body.get('model')}` does not exist or you do "
                               "not have access to it.", "model_not_found")
        fmt = body.get("response_format") or {}
        extra_choice = body.get("structured_outputs") or body.get("guided_choice")
        if fmt.get("type") == "json_schema" and self.json_schema == "reject":
            return 400, _error("response_format 'json_schema' is not supported by this "
                               "server", "invalid_request_error", param="response_format")
        if extra_choice is not None and self.choice == "reject":
            unexpected = {k for k in ("structured_outputs", "guided_choice") if k in body}
            return 422, {"detail": f"Unexpected fields in the request: {unexpected}"}
        try:
            prompt, pixels = _read_message(body.get("messages"))
        except ValueError as exc:
            return 400, _error(str(exc), "invalid_request_error", param="messages")

        schema_enum = None
        if fmt.get("type") == "json_schema" and self.json_schema == "apply":
            schema = fmt["json_schema"]["schema"]
            schema_enum = schema["properties"]["label"]["enum"]
        choices = None
        if extra_choice is not None and self.choice == "apply":
            choices = (extra_choice.get("choice") if isinstance(extra_choice, dict)
                       else extra_choice)
        keys, prompt_labels = self._labels_from_prompt(prompt)
        labels = schema_enum or choices or self.labels or prompt_labels
        if not labels:
            answer = _Answer("I cannot tell.", [("I cannot tell.", [])], len(prompt) // 4)
        else:
            probs = self.answer(pixels, list(labels))
            chosen = max(labels, key=lambda lab: probs[lab])
            if schema_enum is not None:
                answer = self._tokens(probs, chosen, prefix='{"label":"', suffix='"}')
            elif choices is not None:
                answer = self._tokens(probs, chosen, prefix="", suffix="")
            else:
                keys = keys if len(keys) == len(labels) else [str(i) for i in range(len(labels))]
                text = self.text_template.format(label=chosen, key=keys[labels.index(chosen)])
                answer = _Answer(text, [(w, []) for w in re.findall(r"\S+\s*", text)], 0)
            answer.prompt_tokens = 85 + len(prompt) // 4
        return 200, self._completion(body, answer)

    def _tokens(self, probs: dict[str, float], chosen: str, prefix: str,
                suffix: str) -> _Answer:
        """The answer ``prefix + chosen + suffix`` as tokens with exact top logprobs."""
        n = self.token_chars

        def chunks(label: str) -> list[str]:
            return [label[i:i + n] for i in range(0, len(label), n)] + ([suffix] if suffix else [])

        tokens: list[tuple[str, list[tuple[str, float]]]] = []
        head = prefix
        if prefix:
            lead = ['{"', 'label', '":"'] if prefix == '{"label":"' else [prefix]
            if self.merge_quote:
                head = lead.pop()
            else:
                head = ""
            tokens += [(tok, [(tok, 0.0)]) for tok in lead]
        path = chunks(chosen)
        alive = dict(probs)  # labels consistent with the chosen tokens so far
        for k, token in enumerate(path):
            groups: dict[str, float] = {}
            for label, p in alive.items():
                options = chunks(label)
                if k < len(options):
                    groups[options[k]] = groups.get(options[k], 0.0) + p
            total = sum(groups.values())
            top = sorted(((head + tok if k == 0 else tok, math.log(p / total))
                          for tok, p in groups.items() if p > 0), key=lambda t: -t[1])
            tokens.append((head + token if k == 0 else token, top))
            alive = {lab: p for lab, p in alive.items()
                     if k < len(chunks(lab)) and chunks(lab)[k] == token}
        content = prefix + chosen + suffix
        return _Answer(content, tokens, 0)

    def _completion(self, body: dict, answer: _Answer) -> dict:
        choice: dict[str, Any] = {"index": 0, "finish_reason": "stop",
                                  "message": {"role": "assistant", "content": answer.content}}
        if body.get("logprobs") and self.logprobs:
            k = int(body.get("top_logprobs") or 0)
            choice["logprobs"] = {"content": [
                {"token": tok, "logprob": top[0][1] if top and top[0][0] == tok else
                 next((lp for t, lp in top if t == tok), 0.0),
                 "bytes": list(tok.encode()),
                 "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(t.encode())}
                                  for t, lp in top[:k]]}
                for tok, top in answer.tokens]}
        completion_tokens = len(answer.tokens)
        return {"id": f"chatcmpl-{uuid.uuid4().hex[:12]}", "object": "chat.completion",
                "created": int(time.time()), "model": self.model, "choices": [choice],
                "usage": {"prompt_tokens": answer.prompt_tokens,
                          "completion_tokens": completion_tokens,
                          "total_tokens": answer.prompt_tokens + completion_tokens}}

    # -- batches ------------------------------------------------------------------------
    def run_batch(self, batch: dict) -> None:
        """Answer every line of a batch's input file; write output and error files."""
        lines = self.files[batch["input_file_id"]]["content"].decode().splitlines()
        out, err = [], []
        for line in lines:
            if not line.strip():
                continue
            item = json.loads(line)
            image = _image_of(item["body"])
            fault = self._take_fault(image)
            if fault is not None and fault.kind == "bad_request":
                status, payload = 400, _error("Invalid image: the image could not be "
                                              "decoded", "invalid_request_error")
            else:
                status, payload = self.compose(item["body"])
            record = {"id": f"batch_req_{uuid.uuid4().hex[:8]}",
                      "custom_id": item["custom_id"],
                      "response": {"status_code": status, "body": payload}, "error": None}
            (out if status == 200 else err).append(json.dumps(record))
        batch["output_file_id"] = self._add_file("\n".join(out).encode(), "batch_output")
        if err:
            batch["error_file_id"] = self._add_file("\n".join(err).encode(), "batch_output")
        batch["request_counts"] = {"total": len(out) + len(err), "completed": len(out),
                                   "failed": len(err)}
        batch["status"] = "completed"
        batch["completed_at"] = int(time.time())

    def _add_file(self, content: bytes, purpose: str, filename: str = "data.jsonl") -> str:
        file_id = f"file-{uuid.uuid4().hex[:16]}"
        self.files[file_id] = {"id": file_id, "object": "file", "bytes": len(content),
                               "created_at": int(time.time()), "filename": filename,
                               "purpose": purpose, "status": "processed", "content": content}
        return file_id


def _error(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code or kind}}


def _read_message(messages) -> tuple[str, np.ndarray]:
    """(prompt text, RGB pixels) of the user message; ValueError says what is wrong."""
    from PIL import Image

    if not isinstance(messages, list) or not messages:
        raise ValueError("'messages' must be a non-empty list")
    content = messages[-1].get("content")
    parts = content if isinstance(content, list) else [{"type": "text", "text": content}]
    texts = [p.get("text", "") for p in parts if p.get("type") == "text"]
    images = [p["image_url"] for p in parts if p.get("type") == "image_url"]
    if len(images) != 1:
        raise ValueError(f"expected one image_url part, got {len(images)}")
    url = images[0]["url"] if isinstance(images[0], dict) else images[0]
    head, _, data = url.partition(",")
    if head != "data:image/png;base64":
        raise ValueError("Invalid image: expected a base64 PNG data URL")
    try:
        with Image.open(io.BytesIO(base64.b64decode(data, validate=True))) as img:
            pixels = np.asarray(img.convert("RGB"))
    except Exception:
        raise ValueError("Invalid image: the image could not be decoded") from None
    return "\n".join(texts), pixels


def _image_of(body: Any) -> str | None:
    """Digest of the PNG in a chat request body, if there is one."""
    try:
        for part in body["messages"][-1]["content"]:
            if part.get("type") == "image_url":
                url = part["image_url"]["url"]
                return image_digest(base64.b64decode(url.partition(",")[2]))
    except (KeyError, TypeError, AttributeError, ValueError, IndexError):
        pass
    return None


class _QuietServer(ThreadingHTTPServer):
    """A client that hangs up (a cancelled or timed-out request) is not an error. The
    listen backlog is raised from socketserver's 5, which otherwise caps how many
    new connections arrive at once."""

    daemon_threads = True
    request_queue_size = 256

    def handle_error(self, request, client_address) -> None:
        import sys

        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    #: TCP_NODELAY, as real servers set it: headers and body go out in two writes,
    #: and Nagle's algorithm would hold the body for the client's delayed ACK (~40 ms)
    disable_nagle_algorithm = True
    server_version = "glue-vlm-test-server/1"

    def log_message(self, format, *args) -> None:  # noqa: A002 - quiet by default
        pass

    @property
    def owner(self) -> OpenAITestServer:
        return self.server.owner  # type: ignore[attr-defined]

    # -- plumbing -----------------------------------------------------------------------
    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, payload: Any, content_type: str = "application/json",
              headers: dict[str, str] | None = None) -> None:
        data = payload if isinstance(payload, bytes) else (
            payload.encode() if isinstance(payload, str) else json.dumps(payload).encode())
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _drop(self) -> None:
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _headers(self) -> dict[str, str]:
        return {name.lower(): value for name, value in self.headers.items()}

    def _authorized(self) -> bool:
        key = self.owner.api_key
        return key is None or self.headers.get("Authorization") == f"Bearer {key}"

    def _reject_key(self) -> None:
        presented = (self.headers.get("Authorization") or "").removeprefix("Bearer ")
        self._send(401, _error(f"Incorrect API key provided: {presented}.",
                               "invalid_request_error", code="invalid_api_key"))

    # -- routes -------------------------------------------------------------------------
    def do_GET(self) -> None:  # noqa: N802
        owner = self.owner
        self._body()
        path = self.path.split("?")[0]
        owner._record(RecordedRequest("GET", path, self._headers(), None, time.time(), 0))
        if not self._authorized():
            return self._reject_key()
        if path == "/v1/models":
            return self._send(200, {"object": "list", "data": [
                {"id": owner.model, "object": "model", "owned_by": "test"}]})
        match = re.fullmatch(r"/v1/batches/([\w-]+)", path)
        if match and match.group(1) in owner.batches:
            batch = owner.batches[match.group(1)]
            if batch["status"] == "in_progress" and \
                    time.time() >= owner.batch_started[batch["id"]] + owner.batch_delay:
                owner.run_batch(batch)
            return self._send(200, batch)
        match = re.fullmatch(r"/v1/files/([\w-]+)/content", path)
        if match and match.group(1) in owner.files:
            return self._send(200, owner.files[match.group(1)]["content"],
                              "application/octet-stream")
        self._send(404, _error(f"no route {path}", "not_found"))

    def do_POST(self) -> None:  # noqa: N802
        owner = self.owner
        received = time.monotonic()
        raw = self._body()
        path = self.path.split("?")[0]
        try:
            body: Any = json.loads(raw) if raw and "json" in (
                self.headers.get("Content-Type") or "") else raw
        except ValueError:
            return self._send(400, _error("request body is not JSON", "invalid_request_error"))
        if path == "/v1/chat/completions":
            return self._chat(body, received)
        owner._record(RecordedRequest("POST", path, self._headers(), body, time.time(), 0))
        if not self._authorized():
            return self._reject_key()
        if path == "/v1/files":
            return self._upload(raw)
        if path == "/v1/batches":
            batch_id = f"batch_{uuid.uuid4().hex[:16]}"
            batch = {"id": batch_id, "object": "batch", "endpoint": body["endpoint"],
                     "input_file_id": body["input_file_id"],
                     "completion_window": body["completion_window"],
                     "status": "in_progress", "created_at": int(time.time()),
                     "output_file_id": None, "error_file_id": None, "errors": None,
                     "request_counts": {"total": 0, "completed": 0, "failed": 0},
                     "metadata": body.get("metadata")}
            owner.batches[batch_id] = batch
            owner.batch_started[batch_id] = time.time()
            return self._send(200, batch)
        self._send(404, _error(f"no route {path}", "not_found"))

    def _upload(self, raw: bytes) -> None:
        head = f"Content-Type: {self.headers.get('Content-Type')}\r\n\r\n".encode()
        message = BytesParser(policy=HTTP).parsebytes(head + raw)
        fields: dict[str, tuple[str | None, bytes]] = {}
        for part in message.iter_parts():
            fields[part.get_param("name", header="content-disposition")] = (
                part.get_filename(), part.get_payload(decode=True))
        filename, content = fields["file"]
        purpose = fields.get("purpose", (None, b"batch"))[1].decode()
        file_id = self.owner._add_file(content, purpose, filename or "upload.jsonl")
        info = {k: v for k, v in self.owner.files[file_id].items() if k != "content"}
        self._send(200, info)

    def _chat(self, body: Any, received: float) -> None:
        """Answer ``latency`` seconds after the request arrived: the server's own work
        (reading the body, decoding the image) counts inside that time, as on a real
        server whose latency is L, not on top of it."""
        owner = self.owner
        image = _image_of(body)
        record = RecordedRequest("POST", "/v1/chat/completions", self._headers(), body,
                                 time.time(), owner._enter(), image=image)
        owner._record(record)
        try:
            if not self._authorized():
                record.status = 401
                return self._reject_key()
            fault = owner._take_fault(image)
            record.fault = fault.kind if fault else None
            if fault is not None:
                if fault.kind == "timeout":
                    time.sleep(fault.delay)
                else:
                    record.status = self._fault(fault)
                    return
            status, payload = owner.compose(body if isinstance(body, dict) else {})
            remaining = owner.latency - (time.monotonic() - received)
            if remaining > 0:
                time.sleep(remaining)
            record.status = status
            self._send(status, payload)
        finally:
            record.finished = time.time()
            owner._leave()

    def _fault(self, fault: Fault) -> int:
        """Answer with ``fault``; return the status sent (0: none)."""
        kind = fault.kind
        if kind == "drop":
            self._drop()
            return 0
        ok_body = {"id": "chatcmpl-x", "object": "chat.completion", "created": 0,
                   "model": self.owner.model, "choices": []}
        html = ("<html><head><title>502 Bad Gateway</title></head><body><center>"
                "<h1>502 Bad Gateway</h1></center><hr><center>nginx</center></body></html>")
        responses = {
            "rate_limit": (429, _error("Rate limit reached for requests", "requests",
                                       code="rate_limit_exceeded")),
            "insufficient_quota": (429, _error("You exceeded your current quota, please "
                                               "check your plan and billing details.",
                                               "insufficient_quota")),
            "server_error": (500, _error("The server had an error while processing your "
                                         "request.", "server_error")),
            "bad_gateway_html": (502, html),
            "unauthorized": (401, None),
            "forbidden": (403, _error("Project does not have access to this model",
                                      "permission_denied")),
            "bad_request": (400, _error("Invalid image: the image could not be decoded",
                                        "invalid_request_error", param="messages")),
            "model_not_found": (404, _error(f"The model `{self.owner.model}` does not "
                                            "exist or you do not have access to it.",
                                            "model_not_found")),
            "malformed": (200, "{'id': 'chatcmpl-x', choices: [oops"),
            "truncated": (200, json.dumps({**ok_body, "choices": [{"index": 0, "message": {
                "role": "assistant", "content": '{"label":"x"}'}}]})[:60]),
            "empty_choices": (200, ok_body),
            "html": (200, html),
        }
        status, payload = responses[kind]
        if kind == "unauthorized":
            self._reject_key()
            return 401
        headers = {"Retry-After": fault.retry_after} if fault.retry_after else None
        content_type = "text/html" if kind in ("html", "bad_gateway_html") else "application/json"
        self._send(status, payload, content_type, headers)
        return status


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def serve_transformers(model_dir: str | Path, *, startup_timeout: float = 180.0,
                       log_path: str | Path | None = None) -> Iterator[str]:
    """Run ``transformers serve`` on ``model_dir`` (offline, CPU) on a free port; yields
    its base URL (the model name to request is ``str(model_dir)``). Stops it on exit."""
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_HUB_DISABLE_TELEMETRY": "1"}
    command = [sys.executable, "-m", "transformers.cli.transformers", "serve",
               str(model_dir), "--host", "127.0.0.1", "--port", str(port),
               "--device", "cpu"]
    log = open(log_path, "wb") if log_path else subprocess.DEVNULL
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + startup_timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"transformers serve exited with code {process.returncode}"
                                   + (f"; see {log_path}" if log_path else ""))
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"transformers serve did not start within "
                                       f"{startup_timeout:.0f} s") from None
                time.sleep(0.25)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if log_path:
            log.close()


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--latency", type=float, default=0.0)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    args = parser.parse_args(argv)
    server = OpenAITestServer(latency=args.latency, model=args.model, port=args.port).start()
    print(f"serving {args.model} at {server.base_url} (Ctrl-C stops)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        server.stop()


if __name__ == "__main__":
    main()
