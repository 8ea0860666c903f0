"""The OpenAI backend over HTTP, through the real openai SDK, against the project's own
OpenAI-compatible server (glue_vlm.testing.openai_server) on localhost: request shape,
mode probing and degrading, logprobs -> probabilities, every fault, replicas, keys."""

import asyncio
import base64
import email.utils
import io
import json
import logging
import sqlite3
import time

import numpy as np
import pytest
from astropy.table import Table
from hypothesis import given, settings, strategies as st
from PIL import Image

from glue_vlm.backends.base import BackendError, create_backend
from glue_vlm.backends.openai import PRICES, OpenAIBackend
from glue_vlm.backends.openai_logprobs import label_probabilities
from glue_vlm.backends.openai_transport import AdaptiveLimit, Redactor, retry_after_seconds
from glue_vlm.cli import main as cli_main
from glue_vlm.run import classify, stamp_settings_for
from glue_vlm.stamps import CubeSource, Stamp, encode_png, iter_stamps
from glue_vlm.store import ResultStore
from glue_vlm.tasks import PRESETS, Task
from glue_vlm.testing.openai_server import OpenAITestServer, default_answer, image_digest

LSBG = PRESETS["lsbg-vs-artifact"]
MORPH = PRESETS["galaxy-morphology"]  # labels share leading characters (smooth_*)
KEY = "sk-test-0123456789abcdefSECRET"


def make_pixels(i: int, size: int = 8) -> np.ndarray:
    """Pixels whose server answer is label ``i % n`` with confidence set by ``i``."""
    px = np.zeros((size, size, 3), np.uint8)
    px[..., 0] = i
    px[..., 1] = (37 * i) % 256
    px[..., 2] = 200
    return px


def make_stamps(n: int) -> list[Stamp]:
    return [Stamp(i, i, make_pixels(i), encode_png(make_pixels(i))) for i in range(n)]


def expected(stamp: Stamp, task: Task) -> tuple[str, dict[str, float]]:
    probs = default_answer(stamp.pixels, task.label_names)
    return max(probs, key=probs.get), probs


def engine(server: OpenAITestServer, **options) -> OpenAIBackend:
    options = {"model": "test-vlm", "base_url": server.base_url, "api_key": KEY,
               "backoff": 0.01, "timeout": 5.0, "concurrency": 4, **options}
    return OpenAIBackend(**options)


@pytest.fixture
def server():
    with OpenAITestServer() as srv:
        yield srv


# -- pure helpers -------------------------------------------------------------------------
def server_tokens(probs, chosen, token_chars=4, merge_quote=False, json_value=True):
    """Content and logprob tokens as the test server writes them."""
    srv = OpenAITestServer(token_chars=token_chars, merge_quote=merge_quote)
    prefix, suffix = ('{"label":"', '"}') if json_value else ("", "")
    answer = srv._tokens(probs, chosen, prefix, suffix)
    tokens = [{"token": tok, "logprob": dict(top).get(tok, 0.0),
               "top_logprobs": [{"token": t, "logprob": lp} for t, lp in top]}
              for tok, top in answer.tokens]
    return answer.content, tokens


label_sets = st.lists(st.text("abcs_", min_size=1, max_size=9), min_size=2, max_size=6,
                      unique=True)


@settings(max_examples=150, deadline=None)
@given(labels=label_sets, data=st.data())
def test_label_probabilities_recover_the_chosen_label_exactly(labels, data):
    weights = data.draw(st.lists(st.floats(0.01, 1.0), min_size=len(labels),
                                 max_size=len(labels)))
    probs = {lab: w / sum(weights) for lab, w in zip(labels, weights)}
    chosen = data.draw(st.sampled_from(labels))
    token_chars = data.draw(st.integers(1, 5))
    merge = data.draw(st.booleans())
    json_value = data.draw(st.booleans())
    content, tokens = server_tokens(probs, chosen, token_chars, merge, json_value)
    got = label_probabilities(content, tokens, labels, json_value=json_value)
    assert got is not None
    assert sum(got.values()) == pytest.approx(1.0)
    assert got[chosen] > 0
    if any(a != b and b.startswith(a) for a in labels for b in labels):
        return  # one label begins another: a token ending inside both is ambiguous
    assert got[chosen] == pytest.approx(probs[chosen], rel=1e-6)
    # a label alone in its first token's group is exact too
    first = {lab: lab[:token_chars] for lab in labels}
    for lab in labels:
        if sum(first[o] == first[lab] for o in labels) == 1:
            assert got[lab] == pytest.approx(probs[lab], rel=1e-6)


def test_label_probabilities_refuse_tokens_that_do_not_spell_the_answer():
    content, tokens = server_tokens({"a": 0.5, "b": 0.5}, "a")
    assert label_probabilities(content + " ", tokens, ["a", "b"]) is None
    assert label_probabilities('{"other":"a"}', [{"token": '{"other":"a"}'}], ["a", "b"]) is None


def test_label_probabilities_ignore_alternatives_that_are_no_label():
    # pre-constraint logprobs: the best alternative is not a label at all
    tokens = [{"token": '{"label":"', "logprob": 0.0, "top_logprobs": []},
              {"token": "cat", "logprob": np.log(0.3), "top_logprobs": [
                  {"token": "The", "logprob": np.log(0.5)},
                  {"token": "cat", "logprob": np.log(0.3)},
                  {"token": "dog", "logprob": np.log(0.1)}]},
              {"token": '"}', "logprob": 0.0, "top_logprobs": []}]
    got = label_probabilities('{"label":"cat"}', tokens, ["cat", "dog"])
    assert got == pytest.approx({"cat": 0.75, "dog": 0.25})


def test_retry_after_in_seconds_milliseconds_and_http_date():
    now = time.time()
    assert retry_after_seconds({"retry-after": "3"}) == 3.0
    assert retry_after_seconds({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    date = email.utils.formatdate(now + 30, usegmt=True)
    assert retry_after_seconds({"retry-after": date}, now=now) == pytest.approx(30, abs=1)
    assert retry_after_seconds({"retry-after": "soon"}) is None
    assert retry_after_seconds({}) is None


def test_adaptive_limit_halves_once_per_window_and_recovers():
    async def scenario():
        limit = AdaptiveLimit(8)
        windows = [await limit.acquire() for _ in range(8)]
        assert limit.active == 8
        blocked = asyncio.ensure_future(limit.acquire())
        await asyncio.sleep(0)
        assert not blocked.done()
        for w in windows:  # a burst of 429s from one window cuts once
            limit.rate_limited(w, None)
            limit.release()
        assert (limit.limit, limit.lowest) == (4, 4)
        await blocked
        limit.release()
        limit.rate_limited(limit.window, None)  # a 429 on a request sent after the cut
        assert limit.limit == 2
        held = [await limit.acquire() for _ in range(2)]
        extra = asyncio.ensure_future(limit.acquire())
        await asyncio.sleep(0)
        assert not extra.done()  # never more than the limit in flight
        limit.succeeded()
        limit.succeeded()  # two successes at limit 2: one more slot
        await asyncio.wait_for(extra, 1)
        assert limit.limit == 3 and limit.lowest == 2
        for _ in held:
            limit.release()
    asyncio.run(scenario())


def test_redactor_removes_keys_and_bearer_tokens():
    redact = Redactor("my-private-key-123")
    text = redact("key my-private-key-123, other sk-abcdefgh12345, Bearer xyz.abc")
    assert "my-private-key-123" not in text and "sk-abcdefgh12345" not in text
    assert "xyz.abc" not in text


# -- settings, cost -----------------------------------------------------------------------
def test_settings_hold_no_key_and_ignore_replica_order(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    one = OpenAIBackend(model="m", base_url="http://a:1/v1", api_key=KEY)
    two = OpenAIBackend(model="m", base_url=["http://b:2/v1/", "http://a:1/v1"])
    assert one.settings() == two.settings()
    assert KEY not in json.dumps(one.settings()) + repr(one)
    assert one.settings() != OpenAIBackend(model="m", base_url="http://a:1/v1",
                                           detail="high").settings()
    assert one.settings() != OpenAIBackend(model="m2", base_url="http://a:1/v1").settings()


def test_official_endpoint_needs_a_key(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(BackendError, match="OPENAI_API_KEY"):
        OpenAIBackend()
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    assert OpenAIBackend().model == "gpt-4o"


@pytest.mark.parametrize("bad, match", [({"detail": "medium"}, "detail"),
                                        ({"concurrency": 0}, "concurrency"),
                                        ({"base_url": "localhost:8000"}, "http://")])
def test_bad_options_say_what_to_change(bad, match):
    with pytest.raises(BackendError, match=match):
        create_backend("openai", api_key=KEY, **bad)


def test_cost_estimate_gpt4o(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    low = OpenAIBackend().estimate_cost(1000, LSBG)
    price = PRICES["gpt-4o"]
    assert low.dollars == pytest.approx((low.input_tokens * price["input"] +
                                         low.output_tokens * price["output"]) / 1e6)
    assert low.input_tokens >= 1000 * 85 and "85 tokens" in low.describe()
    assert OpenAIBackend().estimate_cost(2000, LSBG).dollars == pytest.approx(2 * low.dollars)
    assert OpenAIBackend(batch_api=True).estimate_cost(1000, LSBG).dollars == \
        pytest.approx(low.dollars / 2)
    assert OpenAIBackend(detail="high").estimate_cost(1000, LSBG).input_tokens > \
        low.input_tokens
    # the mini model bills many more tokens per image at a much lower price
    mini = OpenAIBackend(model="gpt-4o-mini-2024-07-18").estimate_cost(1000, LSBG)
    assert mini.input_tokens > 10 * low.input_tokens and mini.dollars < low.dollars
    custom = OpenAIBackend(prices={"input": 1.0, "output": 0.0}).estimate_cost(1000, LSBG)
    assert custom.dollars == pytest.approx(custom.input_tokens / 1e6)


def test_cost_estimate_self_hosted_is_free_unless_priced():
    local = OpenAIBackend(model="llava", base_url="http://localhost:8000/v1")
    assert local.estimate_cost(10, LSBG).dollars is None
    assert OpenAIBackend(model="gpt-5-new", api_key=KEY).estimate_cost(10, LSBG).dollars is None


# -- requests and answers -------------------------------------------------------------------
def test_request_carries_png_detail_schema_and_temperature(server):
    stamps = make_stamps(3)
    with engine(server, detail="low") as backend:
        preds = backend.predict(stamps, LSBG)
    assert [p.ok for p in preds] == [True] * 3
    requests = server.chat_requests()
    assert len(requests) == 3
    for req in requests:
        assert req.headers["authorization"] == f"Bearer {KEY}"
        body = req.body
        assert body["model"] == "test-vlm" and body["temperature"] == 0
        assert body["max_tokens"] > 0 and body["logprobs"] is True
        assert body["top_logprobs"] >= len(LSBG.labels)
        schema = body["response_format"]["json_schema"]
        assert schema["strict"] is True
        assert schema["schema"]["properties"]["label"]["enum"] == LSBG.label_names
        parts = body["messages"][0]["content"]
        image = next(p["image_url"] for p in parts if p["type"] == "image_url")
        assert image["detail"] == "low"
        head, data = image["url"].split(",", 1)
        assert head == "data:image/png;base64"
        pixels = np.asarray(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB"))
        assert any(np.array_equal(pixels, s.pixels) for s in stamps)
        text = next(p["text"] for p in parts if p["type"] == "text")
        assert all(name in text for name in LSBG.label_names)
    sent = {r.image for r in requests}
    assert sent == {image_digest(s.png) for s in stamps}


@pytest.mark.parametrize("task", [LSBG, MORPH], ids=["lsbg", "morphology"])
@pytest.mark.parametrize("merge_quote", [False, True], ids=["split-quote", "merged-quote"])
def test_labels_and_probabilities_follow_the_server(task, merge_quote):
    stamps = make_stamps(10)
    with OpenAITestServer(merge_quote=merge_quote) as srv, engine(srv) as backend:
        preds = backend.predict(stamps, task)
    for stamp, pred in zip(stamps, preds):
        label, probs = expected(stamp, task)
        assert pred.label == label and pred.method == "json_schema+logprobs"
        assert pred.probabilities == pytest.approx(probs, abs=1e-6)
        assert pred.confidence == pytest.approx(probs[label])
        assert pred.prompt_tokens > 0 and pred.completion_tokens > 0
    assert backend.usage.prompt_tokens == sum(p.prompt_tokens for p in preds)
    assert backend.mode == "json_schema"


def test_server_that_ignores_the_schema_degrades_to_parsing_like_transformers_serve():
    stamps = make_stamps(6)
    srv = OpenAITestServer(json_schema="ignore", choice="reject", logprobs=False)
    with srv, engine(srv) as backend:
        preds = backend.predict(stamps, LSBG)
    assert backend.mode == "parse" and not backend.gives_probabilities
    for stamp, pred in zip(stamps, preds):
        assert pred.label == expected(stamp, LSBG)[0]
        assert pred.method == "parse" and pred.probabilities is None
        assert pred.confidence is None and pred.raw_text.startswith("The answer is")
    requests = srv.chat_requests()
    # one probe row walks the ladder (schema ignored, choice refused, free text), then
    # every other row is asked once, in free text
    assert len(requests) == len(stamps) + 2
    assert "response_format" in requests[0].body
    assert "structured_outputs" in requests[1].body and requests[1].status == 422
    for req in requests[2:]:
        assert "response_format" not in req.body and "structured_outputs" not in req.body
        text = next(p["text"] for p in req.body["messages"][0]["content"] if p["type"] == "text")
        assert text == LSBG.render_prompt()


def test_server_that_rejects_the_schema_uses_choice_with_logprobs():
    stamps = make_stamps(5)
    with OpenAITestServer(json_schema="reject") as srv, engine(srv) as backend:
        preds = backend.predict(stamps, MORPH)
    assert backend.mode == "choice"
    for stamp, pred in zip(stamps, preds):
        label, probs = expected(stamp, MORPH)
        assert pred.label == label and pred.method == "choice+logprobs"
        assert pred.probabilities == pytest.approx(probs, abs=1e-6)
    assert srv.chat_requests()[-1].body["structured_outputs"] == {"choice": MORPH.label_names}


def test_server_without_logprobs_gives_labels_of_unknown_confidence():
    stamps = make_stamps(4)
    with OpenAITestServer(logprobs=False) as srv, engine(srv) as backend:
        preds = backend.predict(stamps, LSBG)
    assert [p.label for p in preds] == [expected(s, LSBG)[0] for s in stamps]
    assert {p.method for p in preds} == {"json_schema"}
    assert all(p.probabilities is None and p.confidence is None for p in preds)


def test_server_that_refuses_logprobs_is_asked_without_them(server):
    class NoLogprobs(OpenAITestServer):
        def compose(self, body):
            if body.get("logprobs"):
                return 400, {"error": {"message": "logprobs are not supported"}}
            return super().compose(body)

    with NoLogprobs() as srv, engine(srv) as backend:
        preds = backend.predict(make_stamps(3), LSBG)
    assert all(p.ok and p.method == "json_schema" for p in preds)
    assert "logprobs" not in srv.chat_requests()[-1].body


# -- faults ---------------------------------------------------------------------------------
RETRIED = ["rate_limit", "server_error", "bad_gateway_html", "timeout", "drop"]
NOT_RETRIED = {"bad_request": "HTTP 400: Invalid image", "malformed": "not valid JSON",
               "truncated": "not valid JSON", "empty_choices": "no choices",
               "html": "HTML page"}


@pytest.mark.parametrize("fault", RETRIED)
def test_transient_fault_is_retried_and_the_row_answered(server, fault):
    stamps = make_stamps(5)
    server.inject(fault, times=1, image=stamps[2].png, delay=1.0)
    with engine(server, timeout=0.5) as backend:
        preds = backend.predict(stamps, LSBG)
    assert [p.label for p in preds] == [expected(s, LSBG)[0] for s in stamps]
    hits = [r for r in server.chat_requests() if r.image == image_digest(stamps[2].png)]
    assert len(hits) == 2 and hits[0].fault == fault and hits[1].status == 200
    assert backend.stats.retries == 1


@pytest.mark.parametrize("fault", RETRIED)
def test_persistent_fault_fails_only_its_row_after_bounded_retries(server, fault):
    stamps = make_stamps(5)
    server.inject(fault, times=None, image=stamps[3].png, retry_after="0", delay=1.0)
    with engine(server, timeout=0.4, max_retries=2) as backend:
        preds = backend.predict(stamps, LSBG)
    assert preds[3].label is None and "gave up after 3 attempts" in preds[3].error
    assert [p.label for i, p in enumerate(preds) if i != 3] == \
        [expected(s, LSBG)[0] for i, s in enumerate(stamps) if i != 3]
    hits = [r for r in server.chat_requests() if r.image == image_digest(stamps[3].png)]
    assert len(hits) == 3


@pytest.mark.parametrize("fault", list(NOT_RETRIED))
def test_bad_answer_fails_its_row_with_reason_and_raw_body(server, fault):
    stamps = make_stamps(5)
    server.inject(fault, times=None, image=stamps[2].png)
    with engine(server) as backend:
        preds = backend.predict(stamps, LSBG)
    bad = preds[2]
    assert bad.label is None and NOT_RETRIED[fault] in bad.error
    if fault != "bad_request":
        assert bad.raw_text  # what the server sent is kept for the user to see
    if fault == "html":
        assert "502 Bad Gateway" in bad.raw_text
    assert all(p.ok for i, p in enumerate(preds) if i != 2)
    hits = [r for r in server.chat_requests() if r.image == image_digest(stamps[2].png)]
    assert len(hits) == 1  # not retried: a rerun retries it


def test_bad_image_on_the_probe_row_fails_that_row_only(server):
    stamps = make_stamps(4)
    server.inject("bad_request", times=None, image=stamps[0].png)
    with engine(server) as backend:
        preds = backend.predict(stamps, LSBG)
    assert preds[0].label is None and "Invalid image" in preds[0].error
    assert all(p.ok and p.method == "json_schema+logprobs" for p in preds[1:])
    assert backend.mode == "json_schema"


def test_retry_after_seconds_is_honoured(server):
    stamps = make_stamps(2)
    server.inject("rate_limit", image=stamps[1].png, retry_after="1")
    with engine(server) as backend:
        preds = backend.predict(stamps, LSBG)
    assert all(p.ok for p in preds)
    hits = [r for r in server.chat_requests() if r.image == image_digest(stamps[1].png)]
    assert hits[1].started - hits[0].finished >= 0.95


def test_retry_after_http_date_is_honoured(server):
    stamps = make_stamps(2)
    server.inject("rate_limit", image=stamps[1].png,
                  retry_after=email.utils.formatdate(time.time() + 2, usegmt=True))
    with engine(server) as backend:
        preds = backend.predict(stamps, LSBG)
    assert all(p.ok for p in preds)
    hits = [r for r in server.chat_requests() if r.image == image_digest(stamps[1].png)]
    assert hits[1].started - hits[0].finished >= 0.9


def test_retry_after_beyond_the_limit_stops_with_come_back_later(server):
    server.inject("rate_limit", times=None, retry_after="3600")
    with engine(server) as backend, pytest.raises(BackendError, match="wait 3600 s"):
        backend.predict(make_stamps(2), LSBG)


def test_repeated_429_lowers_concurrency(server):
    server.latency = 0.1
    stamps = make_stamps(24)
    with engine(server, concurrency=8) as backend:
        backend.predict(stamps[:1], LSBG)  # settle the mode first
        server.reset()
        server.inject("rate_limit", times=8)
        preds = backend.predict(stamps[1:], LSBG)
    assert all(p.ok for p in preds)
    assert backend.stats.rate_limited == 8
    assert backend.lowest_concurrency <= 4
    requests = server.chat_requests()
    storm_end = max(r.finished for r in requests if r.fault == "rate_limit")
    first_answer = min(r.finished for r in requests if r.status == 200)
    after = [r for r in requests if storm_end < r.started < first_answer]
    assert after and max(r.in_flight for r in after) <= 4
    assert server.max_in_flight <= 8


@pytest.mark.parametrize("fault, match", [("unauthorized", "check your API key"),
                                          ("forbidden", "check your API key"),
                                          ("model_not_found", "check --model"),
                                          ("insufficient_quota", "billing")])
def test_fatal_errors_stop_with_one_clear_line_and_no_key(server, fault, match, caplog):
    caplog.set_level(logging.DEBUG)
    server.inject(fault, times=None)
    with engine(server) as backend, pytest.raises(BackendError, match=match) as info:
        backend.predict(make_stamps(3), LSBG)
    message = str(info.value)
    assert "\n" not in message and KEY not in message
    assert KEY not in caplog.text
    assert info.value.__cause__ is None


def test_wrong_key_echoed_by_the_server_is_redacted(caplog):
    caplog.set_level(logging.DEBUG)
    with OpenAITestServer(api_key="the-right-key") as srv, engine(srv) as backend:
        with pytest.raises(BackendError, match="401") as info:
            backend.predict(make_stamps(2), LSBG)
    assert srv.chat_requests()[0].status == 401
    assert KEY not in str(info.value) and "SECRET" not in str(info.value)
    assert KEY not in caplog.text


def test_unreachable_server_stops_the_run():
    with OpenAITestServer() as srv:
        url = srv.base_url
    backend = OpenAIBackend(model="test-vlm", base_url=url, backoff=0.01, max_retries=1)
    with backend, pytest.raises(BackendError, match="is the server running"):
        backend.predict(make_stamps(2), LSBG)


def test_fatal_error_mid_batch_keeps_paid_answers_and_stops_next_call(server):
    stamps = make_stamps(6)
    server.latency = 0.05
    server.inject("unauthorized", times=None, image=stamps[5].png)
    with engine(server, concurrency=1) as backend:
        preds = backend.predict(stamps, LSBG)
        assert [p.ok for p in preds] == [True] * 5 + [False]
        assert "check your API key" in preds[5].error
        with pytest.raises(BackendError, match="check your API key"):
            backend.predict(stamps[:1], LSBG)


# -- replicas -------------------------------------------------------------------------------
def test_replicas_share_the_work():
    stamps = make_stamps(16)
    with OpenAITestServer(latency=0.05) as a, OpenAITestServer(latency=0.05) as b:
        with engine(a, base_url=[a.base_url, b.base_url]) as backend:
            preds = backend.predict(stamps, LSBG)
        assert [p.label for p in preds] == [expected(s, LSBG)[0] for s in stamps]
        assert len(a.chat_requests()) >= 4 and len(b.chat_requests()) >= 4
        assert len(a.chat_requests()) + len(b.chat_requests()) == 16


def test_a_dead_replica_is_routed_around():
    with OpenAITestServer() as dead:
        dead_url = dead.base_url
    stamps = make_stamps(8)
    with OpenAITestServer() as alive, engine(alive, base_url=[dead_url, alive.base_url],
                                             max_retries=2) as backend:
        preds = backend.predict(stamps, LSBG)
    assert all(p.ok for p in preds)
    assert len(alive.chat_requests()) == 8


# -- through the run and the store ----------------------------------------------------------
def make_cube(n: int) -> np.ndarray:
    return np.stack([make_pixels(i) for i in range(n)])


def run_once(server, cube, store_path, **options):
    backend = engine(server, **options)
    with backend, ResultStore(store_path) as store:
        result = classify(CubeSource(cube), np.arange(len(cube)), LSBG, backend, store=store)
        return result, len(store)


def stamp_png(cube, row, server):
    settings = stamp_settings_for(engine(server))
    return next(iter_stamps(CubeSource(cube), [row], settings)).png


@pytest.mark.parametrize("fault", RETRIED + list(NOT_RETRIED))
def test_run_with_a_fault_loses_nothing_and_a_rerun_retries_only_failures(
        server, tmp_path, fault):
    cube = make_cube(8)
    bad = stamp_png(cube, 5, server)
    server.inject(fault, times=None, image=bad, retry_after="0", delay=1.0)
    result, stored = run_once(server, cube, tmp_path / "s.sqlite", timeout=0.4,
                              max_retries=1)
    assert stored == 8
    assert set(result.errors) == {5} and result.errors[5]
    assert [c for i, c in enumerate(result.codes) if i != 5] == \
        [LSBG.label_names.index(expected(Stamp(i, i, make_pixels(i)), LSBG)[0])
         for i in range(8) if i != 5]
    server.clear_faults()
    server.reset()
    again, stored = run_once(server, cube, tmp_path / "s.sqlite")
    assert [r.image for r in server.chat_requests()] == [image_digest(bad)]
    assert not again.errors and stored == 8
    assert again.codes[5] == LSBG.label_names.index(
        expected(Stamp(5, 5, make_pixels(5)), LSBG)[0])


def test_run_stopped_by_a_bad_key_resumes_without_repeating_answers(server, tmp_path):
    cube = make_cube(16)
    server.inject("unauthorized", times=None, image=stamp_png(cube, 5, server))
    with pytest.raises(BackendError, match="check your API key"):
        run_once(server, cube, tmp_path / "s.sqlite", batch_size=4, concurrency=1)
    with sqlite3.connect(tmp_path / "s.sqlite") as db:
        answered = db.execute("SELECT COUNT(*) FROM results WHERE error IS NULL").fetchone()[0]
    assert answered == 5  # rows 0-4: the batch with row 5 kept its paid answer
    server.clear_faults()
    server.reset()
    result, stored = run_once(server, cube, tmp_path / "s.sqlite")
    assert not result.errors and stored == 16
    assert len(server.chat_requests()) == 16 - answered


def test_no_key_in_the_store_even_when_the_server_echoes_it(tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    srv = OpenAITestServer(json_schema="ignore", choice="reject",
                           text_template="I was called with " + KEY + " and say {key}.")
    cube = make_cube(4)
    with srv:
        srv.inject("bad_request", image=stamp_png(cube, 2, srv))
        result, _ = run_once(srv, cube, tmp_path / "s.sqlite")
    assert not set(result.errors) - {2}
    raw = b"".join(p.read_bytes() for p in tmp_path.iterdir())
    assert KEY.encode() not in raw and b"SECRET" not in raw
    assert KEY not in caplog.text
    with sqlite3.connect(tmp_path / "s.sqlite") as db:
        texts = db.execute("SELECT raw_text FROM results").fetchall()
    assert any("***" in t for (t,) in texts)


# -- command line ---------------------------------------------------------------------------
def write_catalog(tmp_path, n):
    np.save(tmp_path / "stamps.npy", make_cube(n))
    Table({"id": np.arange(n)}).write(tmp_path / "cat.ecsv")
    return ["classify", str(tmp_path / "cat.ecsv"), "--task", LSBG.slug,
            "--stamps", str(tmp_path / "stamps.npy"), "-o", str(tmp_path / "out.ecsv"),
            "--store", str(tmp_path / "s.sqlite"), "--backend", "openai"]


def test_cli_spreads_rows_over_replicas_and_a_rerun_sends_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.setenv("GLUE_VLM_OPENAI_BACKOFF", "0.01")
    n = 12
    argv = write_catalog(tmp_path, n)
    with OpenAITestServer(latency=0.02) as a, OpenAITestServer(latency=0.02) as b:
        argv += ["--model", "test-vlm", "--base-url", a.base_url, "--base-url", b.base_url,
                 "--concurrency", "4", "--detail", "low"]
        assert cli_main(argv) == 0
        assert a.chat_requests() and b.chat_requests()
        assert len(a.chat_requests()) + len(b.chat_requests()) == n
        out = Table.read(tmp_path / "out.ecsv")
        want = [expected(Stamp(i, i, make_pixels(i)), LSBG) for i in range(n)]
        assert list(out["lsbg_vs_artifact_label"]) == [label for label, _ in want]
        assert np.allclose(out["lsbg_vs_artifact_confidence"],
                           [probs[label] for label, probs in want])
        a.reset()
        b.reset()
        assert cli_main(argv + ["--overwrite"]) == 0
        assert not a.chat_requests() and not b.chat_requests()
    assert KEY.encode() not in (tmp_path / "out.ecsv").read_bytes()


def test_cli_refuses_to_start_above_max_cost(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    argv = write_catalog(tmp_path, 50) + ["--max-cost", "0.0001"]
    assert cli_main(argv) == 1
    err = capsys.readouterr().err
    assert "above --max-cost" in err and "85 tokens" in err
    assert not (tmp_path / "out.ecsv").exists()


# -- Batch API --------------------------------------------------------------------------------
def uploaded_lines(server):
    (upload,) = [f for f in server.files.values() if f["purpose"] == "batch"]
    return [json.loads(line) for line in upload["content"].decode().splitlines()]


def test_batch_api_uploads_jsonl_submits_polls_and_collects():
    stamps = make_stamps(6)
    with OpenAITestServer(batch_delay=0.2) as srv:
        srv.inject("bad_request", times=None, image=stamps[4].png)
        with engine(srv, batch_api=True, batch_poll=0.05, batch_wait=None) as backend:
            preds = backend.predict(stamps, MORPH)
        assert not srv.chat_requests() and len(srv.batches) == 1
        polls = [r for r in srv.requests if r.method == "GET" and "/batches/" in r.path]
        assert len(polls) >= 2  # still in progress at first, then completed
        lines = uploaded_lines(srv)
    assert len(lines) == 6 and len({line["custom_id"] for line in lines}) == 6
    for line in lines:
        assert line["url"] == "/v1/chat/completions" and line["body"]["temperature"] == 0
        assert line["body"]["response_format"]["json_schema"]["strict"] is True
    for i, (stamp, pred) in enumerate(zip(stamps, preds)):
        if i == 4:
            assert pred.label is None and "HTTP 400: Invalid image" in pred.error
            continue
        label, probs = expected(stamp, MORPH)
        assert pred.label == label and pred.method == "batch:json_schema+logprobs"
        assert pred.probabilities == pytest.approx(probs, abs=1e-6)


def test_batch_api_job_is_collected_by_a_rerun_not_submitted_again(tmp_path):
    cube = make_cube(6)
    with OpenAITestServer(batch_delay=1.0) as srv:
        def run(**options):
            backend = engine(srv, batch_api=True, batch_poll=0.05, **options)
            with backend, ResultStore(tmp_path / "s.sqlite") as store:
                result = classify(CubeSource(cube), np.arange(6), LSBG, backend,
                                  store=store)
                return result, store.open_batches([line["custom_id"]
                                                   for line in uploaded_lines(srv)])

        first, open_jobs = run()  # submits and finishes: come back later
        assert len(first.errors) == 6
        assert all("run again later" in reason for reason in first.errors.values())
        assert set(open_jobs.values()) == set(srv.batches) and len(open_jobs) == 6
        again, open_jobs = run(batch_wait=None)  # waits for the job this time
        assert len(srv.batches) == 1 and not srv.chat_requests()  # collected, not resubmitted
        assert not open_jobs
    assert not again.errors
    assert list(again.codes) == [LSBG.label_names.index(
        expected(Stamp(i, i, make_pixels(i)), LSBG)[0]) for i in range(6)]
