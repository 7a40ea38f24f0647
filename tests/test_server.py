"""The server in-process (httpx over ASGI): every endpoint, streaming and not, errors and auth.

A tiny llama target and a slightly perturbed copy of it as the draft, so that rounds accept some
drafted tokens and reject others. Greedy answers are checked against the decoding loop itself.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from specdecode.decoding import SpeculativeGenerator, TextStream
from specdecode.drafters import ModelDrafter
from specdecode.models import load_model
from specdecode.server import Engine, ServerSettings, create_app
from specdecode.server.engine import ChoiceSpec, GenerationOptions, JobEnd, JobSpec
from specdecode.server.segments import SegmentTracker
from specdecode.testing import make_tiny_model, perturbed_copy

MODEL = "tiny"
KEY = "sk-test-key"
USER = [{"role": "user", "content": "Speculative decoding drafts tokens"}]


# ----------------------------------------------------------------------------- fixtures
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Target and draft folders, built once per session and shared by the server test modules."""
    root = tmp_path_factory.getbasetemp() / "server-tiny-models"
    if not (root / "built").exists():
        make_tiny_model(root / "target", "llama")
        perturbed_copy(root / "target", root / "draft", scale=0.005)  # agrees often, not always
        (root / "built").touch()
    return root


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_models(tmp_path_factory)


@pytest.fixture(scope="module")
def generator(model_dir: Path) -> Iterator[SpeculativeGenerator]:
    threads = torch.get_num_threads()  # one thread: CPUs here are shared; restored after
    target = load_model(model_dir / "target", device="cpu", threads=1)
    draft = load_model(model_dir / "draft", device="cpu")
    yield SpeculativeGenerator(target, ModelDrafter(draft), draft_length=4)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def engine(generator: SpeculativeGenerator) -> Iterator[Engine]:
    engine = Engine(generator, max_queue=8, timeout=60)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def app(engine: Engine) -> Any:
    return create_app(engine, ServerSettings(served_model_name=MODEL, max_body_bytes=4096))


@pytest.fixture(scope="module")
def keyed_app(engine: Engine) -> Any:
    return create_app(engine, ServerSettings(served_model_name=MODEL, api_keys=(KEY, "other")))


def request(app: Any, method: str, url: str, **kwargs: Any) -> httpx.Response:
    """One request to ``app`` in-process (the body is read whole, streamed or not)."""

    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.request(method, url, **kwargs)

    return asyncio.run(go())


def post(app: Any, url: str, body: dict[str, Any], **kwargs: Any) -> httpx.Response:
    return request(app, "POST", url, json=body, **kwargs)


def sse(response: httpx.Response) -> list[Any]:
    """The JSON bodies of an SSE response, checking that it ends with ``data: [DONE]``."""
    assert response.headers["content-type"].startswith("text/event-stream")
    frames = [f for f in response.text.split("\n\n") if f.startswith("data: ")]
    assert frames[-1] == "data: [DONE]"
    return [json.loads(f[len("data: ") :]) for f in frames[:-1]]


def chat_body(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": USER, "max_tokens": 24, **fields}


def expect_error(response: httpx.Response, status: int, param: str | None = None) -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param
    return str(error["message"])


def chat_ids(generator: SpeculativeGenerator, messages: list[dict[str, str]]) -> list[int]:
    encoded = generator.target.tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True
    )
    return list(encoded["input_ids"])


# ----------------------------------------------------------------------------- endpoints
def test_models_health_metrics_and_page(app: Any) -> None:
    models = request(app, "GET", "/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == [MODEL]
    assert request(app, "GET", f"/v1/models/{MODEL}").json()["id"] == MODEL
    expect_error(request(app, "GET", "/v1/models/other"), 404, "model")
    health = request(app, "GET", "/health").json()
    assert health["status"] == "ok" and health["model"] == MODEL
    page = request(app, "GET", "/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert '<script src="/static/app.js">' in page.text
    assert "specdecode" in request(app, "GET", "/static/app.js").text
    metrics = request(app, "GET", "/metrics")
    assert metrics.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert "# TYPE specdecode_queue_depth gauge" in metrics.text


def test_chat_greedy_matches_the_decoding_loop(app: Any, generator: SpeculativeGenerator) -> None:
    body = post(app, "/v1/chat/completions", chat_body()).json()
    expected = generator.generate(chat_ids(generator, USER), max_new_tokens=24, temperature=0)
    assert body["object"] == "chat.completion" and body["model"] == MODEL
    [choice] = body["choices"]
    assert choice["message"] == {"role": "assistant", "content": expected.text}
    assert choice["finish_reason"] == ("length" if expected.finish_reason == "length" else "stop")
    assert body["usage"] == {
        "prompt_tokens": len(expected.prompt_ids),
        "completion_tokens": len(expected.token_ids),
        "total_tokens": len(expected.prompt_ids) + len(expected.token_ids),
        "prompt_tokens_details": {"cached_tokens": 0},  # this generator keeps no prompt cache
    }
    stats = body["specdecode"]["stats"]
    assert stats["drafted"] == expected.stats.drafted > 0
    assert stats["accepted"] == expected.stats.accepted
    assert stats["tau"] == pytest.approx(expected.stats.tau) and stats["tau"] > 1
    assert 0 < stats["alpha"] <= 1


def test_chat_stream_is_the_same_answer_in_chunks(app: Any) -> None:
    whole = post(app, "/v1/chat/completions", chat_body()).json()
    body = chat_body(stream=True, stream_options={"include_usage": True})
    chunks = sse(post(app, "/v1/chat/completions", body))
    assert {c["id"] for c in chunks} == {chunks[0]["id"]} and chunks[0]["id"].startswith(
        "chatcmpl-"
    )
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    rounds = [c for c in chunks[1:] if c["choices"]]
    text = "".join(c["choices"][0]["delta"]["content"] for c in rounds)
    assert text == whole["choices"][0]["message"]["content"]
    for c in rounds:  # the page's marks: segments cover the chunk's text, per token
        ext = c["specdecode"]
        assert "".join(s["text"] for s in ext["segments"]) == c["choices"][0]["delta"]["content"]
        assert len(ext["tokens"]) == len(ext["from_draft"])
    assert any(any(c["specdecode"]["from_draft"]) for c in rounds)  # accepted drafts
    assert any(not all(c["specdecode"]["from_draft"]) for c in rounds)  # the target's tokens
    assert [c["choices"][0]["finish_reason"] for c in rounds][-1] in ("stop", "length")
    assert rounds[-1]["specdecode"]["stats"]["tau"] == pytest.approx(
        whole["specdecode"]["stats"]["tau"]
    )
    last = chunks[-1]
    assert last["choices"] == [] and last["usage"] == whole["usage"]
    assert last["specdecode"]["stats"]["accepted"] == whole["specdecode"]["stats"]["accepted"]


def test_stream_without_include_usage_has_no_usage_chunk(app: Any) -> None:
    chunks = sse(post(app, "/v1/chat/completions", chat_body(stream=True, max_tokens=5)))
    assert all(c["choices"] and c["usage"] is None for c in chunks)
    assert chunks[-1]["specdecode"]["stats"]["new_tokens"] <= 5


def test_completions_text_ids_and_several_prompts(
    app: Any, generator: SpeculativeGenerator
) -> None:
    prompt = "def add(a, b):"
    expected = generator.generate(prompt, max_new_tokens=12, temperature=0)
    body = post(app, "/v1/completions", {"model": MODEL, "prompt": prompt, "max_tokens": 12})
    assert body.json()["object"] == "text_completion"
    assert body.json()["choices"][0]["text"] == expected.text
    ids = {"model": MODEL, "prompt": expected.prompt_ids, "max_tokens": 12}
    assert post(app, "/v1/completions", ids).json()["choices"][0]["text"] == expected.text
    several = {"model": MODEL, "prompt": [prompt, "import torch"], "n": 2, "max_tokens": 6}
    out = post(app, "/v1/completions", several).json()
    assert [c["index"] for c in out["choices"]] == [0, 1, 2, 3]
    assert out["choices"][0]["text"] == out["choices"][1]["text"]  # greedy: n copies agree
    short = generator.generate(prompt, max_new_tokens=6, temperature=0)
    assert out["choices"][0]["text"] == short.text
    assert len(out["specdecode"]["choices"]) == 4


def test_completions_stream(app: Any) -> None:
    body = {"model": MODEL, "prompt": "for i in", "max_tokens": 16}
    whole = post(app, "/v1/completions", body).json()
    chunks = sse(post(app, "/v1/completions", {**body, "stream": True}))
    assert all(c["object"] == "text_completion" for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["choices"][0]["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]


def test_stop_string_never_reaches_the_client(app: Any) -> None:
    full = post(app, "/v1/completions", {"model": MODEL, "prompt": "The quick", "max_tokens": 40})
    text = full.json()["choices"][0]["text"]
    stop = next(text[i : i + 2] for i in range(5, len(text) - 2) if text[i : i + 2].strip())
    body = {"model": MODEL, "prompt": "The quick", "max_tokens": 40, "stop": [stop]}
    cut = post(app, "/v1/completions", body).json()["choices"][0]
    assert cut["text"] == text[: text.index(stop)] and cut["finish_reason"] == "stop"
    chunks = sse(post(app, "/v1/completions", {**body, "stream": True}))
    assert "".join(c["choices"][0]["text"] for c in chunks) == cut["text"]


def test_max_tokens_fields(app: Any) -> None:
    out = post(app, "/v1/chat/completions", chat_body(max_tokens=3)).json()
    assert out["usage"]["completion_tokens"] <= 3
    both = chat_body(max_tokens=3, max_completion_tokens=7)
    assert post(app, "/v1/chat/completions", both).json()["usage"]["completion_tokens"] <= 7


def test_sampling_with_a_seed_repeats(app: Any) -> None:
    body = chat_body(temperature=1.0, top_p=0.95, top_k=20, seed=11, n=2)
    first, second = (post(app, "/v1/chat/completions", body).json() for _ in range(2))
    texts = [c["message"]["content"] for c in first["choices"]]
    assert texts == [c["message"]["content"] for c in second["choices"]]


def test_a_seed_gives_the_same_text_whatever_the_servers_drafter(
    app: Any, generator: SpeculativeGenerator
) -> None:
    """A seeded request is decoded in the seeded mode: the drafter cannot change the text."""
    body = chat_body(temperature=0.9, top_k=30, seed=5, max_tokens=24)
    with_draft = post(app, "/v1/chat/completions", body).json()
    plain = SpeculativeGenerator(generator.target, None)
    other = Engine(plain, max_queue=2, timeout=60)
    try:
        plain_app = create_app(other, ServerSettings(served_model_name=MODEL))
        without = post(plain_app, "/v1/chat/completions", body).json()
    finally:
        other.close()
    assert with_draft["choices"][0]["message"] == without["choices"][0]["message"]
    assert with_draft["specdecode"]["stats"]["drafted"] > 0


def test_unknown_fields_and_content_parts_are_accepted(app: Any) -> None:
    parts = [{"role": "user", "content": [{"type": "text", "text": USER[0]["content"]}]}]
    body = chat_body(messages=parts, logit_bias={}, user="someone", frequency_penalty=0)
    assert post(app, "/v1/chat/completions", body).status_code == 200


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_tokens", 0),
        ("max_tokens", "5"),
        ("temperature", -1),
        ("temperature", 3),
        ("top_p", 0),
        ("top_k", -2),
        ("n", 0),
        ("stream", "yes"),
        ("stop", ["a", "b", "c", "d", "e"]),
        ("messages", []),
        ("messages", [{"role": "wizard", "content": "hi"}]),
        ("seed", 1.5),
    ],
)
def test_wrong_types_and_values_are_422(app: Any, field: str, value: Any) -> None:
    response = post(app, "/v1/chat/completions", chat_body(**{field: value}))
    assert field in expect_error(response, 422, param=None)


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"model": "gpt-4o", "prompt": "x"}, 404, "model"),
        ({"model": MODEL, "prompt": [999999]}, 400, "prompt"),
        ({"model": MODEL, "prompt": ""}, 400, "prompt"),
        ({"model": MODEL, "prompt": []}, 400, "prompt"),
        ({"model": MODEL, "prompt": list(range(10, 300)) * 2}, 400, "prompt"),
        ({"model": MODEL, "prompt": "x", "n": 9}, 400, "n"),
        ({"model": MODEL, "prompt": "x", "temperature": 1.0, "repetition_penalty": 0}, 422, None),
        ({"prompt": "x"}, 422, "model"),
    ],
)
def test_bad_requests_get_openai_errors(
    app: Any, body: dict[str, Any], status: int, param: str | None
) -> None:
    expect_error(post(app, "/v1/completions", body), status, param)


def test_non_text_content_and_malformed_bodies(app: Any) -> None:
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]
    expect_error(post(app, "/v1/chat/completions", chat_body(messages=image)), 400)
    headers = {"content-type": "application/json"}
    for raw in (b"{not json", b"\xff\xfe", b"[1, 2]", b"null", b"42"):
        response = request(app, "POST", "/v1/chat/completions", content=raw, headers=headers)
        assert response.status_code in (400, 422), raw
        expect_error(response, response.status_code)
    expect_error(request(app, "POST", "/v1/completions", content=b"{", headers=headers), 400)


def test_body_limit_route_and_method_errors(app: Any) -> None:
    big = chat_body(messages=[{"role": "user", "content": "x" * 5000}])
    expect_error(post(app, "/v1/chat/completions", big), 413)

    async def chunked() -> Any:  # no Content-Length: the limit still holds
        yield b'{"model": "tiny", "prompt": "'
        for _ in range(10):
            yield b"y" * 1000
        yield b'"}'

    expect_error(request(app, "POST", "/v1/completions", content=chunked()), 413)
    expect_error(request(app, "GET", "/v1/nothing"), 404)
    expect_error(request(app, "GET", "/v1/chat/completions"), 405)


def test_api_keys(keyed_app: Any) -> None:
    body = chat_body(max_tokens=2)
    expect_error(post(keyed_app, "/v1/chat/completions", body), 401)
    wrong = {"Authorization": "Bearer nope"}
    expect_error(post(keyed_app, "/v1/chat/completions", body, headers=wrong), 401)
    basic = {"Authorization": f"Basic {KEY}"}
    expect_error(post(keyed_app, "/v1/chat/completions", body, headers=basic), 401)
    expect_error(request(keyed_app, "GET", "/v1/models"), 401)
    expect_error(request(keyed_app, "GET", "/metrics"), 401)
    for key in (KEY, "other"):
        good = {"Authorization": f"Bearer {key}"}
        assert post(keyed_app, "/v1/chat/completions", body, headers=good).status_code == 200
    assert request(keyed_app, "GET", "/metrics", headers=good).status_code == 200
    assert request(keyed_app, "GET", "/health").status_code == 200  # open
    assert request(keyed_app, "GET", "/").status_code == 200  # the page asks for the key
    unauthorized = request(keyed_app, "POST", "/v1/completions", content=b"{")
    expect_error(unauthorized, 401)  # keys are checked before the body is even read


# ----------------------------------------------------------------------------- the queue
def _blocked_engine(generator: SpeculativeGenerator, **kwargs: Any) -> tuple[Engine, Any]:
    """An engine whose worker is held inside a job until the returned event is set."""
    engine = Engine(generator, **kwargs)
    release, entered = threading.Event(), threading.Event()

    def hold(update: Any) -> None:
        entered.set()
        release.wait(30)

    spec = JobSpec((ChoiceSpec(0, tuple(generator.encode("x")), 0),), GenerationOptions(0.0, 2), 1)
    engine.submit(spec, hold)
    assert entered.wait(30)
    return engine, release


def test_full_queue_is_429_with_retry_after(generator: SpeculativeGenerator) -> None:
    engine, release = _blocked_engine(generator, max_queue=1, timeout=60)
    app = create_app(engine, ServerSettings(served_model_name=MODEL))
    try:

        async def two_at_once() -> list[httpx.Response]:
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                first = asyncio.create_task(client.post("/v1/chat/completions", json=chat_body()))
                while engine.queue_state().waiting < 1:
                    await asyncio.sleep(0.01)
                second = await client.post("/v1/chat/completions", json=chat_body())
                health = await client.get("/health")
                assert health.json()["waiting"] == 1 and health.json()["running"] == 1
                release.set()
                return [await first, second]

        queued, refused = asyncio.run(two_at_once())
        assert queued.status_code == 200
        expect_error(refused, 429)
        assert refused.json()["error"]["type"] == "rate_limit_error"
        assert int(refused.headers["Retry-After"]) >= 1
        text = request(app, "GET", "/metrics").text
        assert 'specdecode_requests_rejected_total{reason="queue_full"} 1' in text
    finally:
        release.set()
        engine.close()


def test_timeout_ends_requests_with_504(generator: SpeculativeGenerator) -> None:
    engine = Engine(generator, max_queue=4, timeout=0.05)
    app = create_app(engine, ServerSettings(served_model_name=MODEL))
    try:
        long = chat_body(max_tokens=400)
        expect_error(post(app, "/v1/chat/completions", long), 504)
        chunks = sse(post(app, "/v1/chat/completions", {**long, "stream": True}))
        assert chunks[-1]["error"]["type"] == "timeout_error"
        text = request(app, "GET", "/metrics").text
        assert 'specdecode_requests_cancelled_total{reason="timeout"} 2' in text
    finally:
        engine.close()


def test_cancel_stops_a_running_job_and_drops_a_waiting_one(
    generator: SpeculativeGenerator,
) -> None:
    engine, release = _blocked_engine(generator, max_queue=4, timeout=60)
    try:
        updates: list[Any] = []
        options = GenerationOptions(0.0, 400)
        prompt = tuple(generator.encode("x"))
        waiting = engine.submit(JobSpec((ChoiceSpec(0, prompt, 0),), options, 1), updates.append)
        engine.cancel(waiting)
        assert updates == [JobEnd()] and engine.queue_state().waiting == 0
        release.set()

        running_updates: list[Any] = []
        done = threading.Event()

        def sink(update: Any) -> None:
            running_updates.append(update)
            if len(running_updates) == 2:
                engine.cancel(job)
            if isinstance(update, JobEnd):
                done.set()

        job = engine.submit(JobSpec((ChoiceSpec(0, prompt, 0),), options, 1), sink)
        assert done.wait(30)
        assert running_updates[-1] == JobEnd()  # ended quietly: nobody is listening
        tokens = sum(len(u.token_ids) for u in running_updates[:-1])
        assert tokens < 400  # stopped at the next round, long before its end
        assert engine.queue_state().running == 0
    finally:
        release.set()
        engine.close()


def test_event_loop_answers_during_generation(app: Any, engine: Engine) -> None:
    async def go() -> float:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            long = asyncio.create_task(
                client.post("/v1/chat/completions", json=chat_body(max_tokens=300))
            )
            while engine.queue_state().running == 0:
                await asyncio.sleep(0.005)
            tick = time.perf_counter()
            assert (await client.get("/health")).status_code == 200
            assert (await client.get("/metrics")).status_code == 200
            took = time.perf_counter() - tick
            assert engine.queue_state().running == 1  # still generating meanwhile
            assert (await long).status_code == 200
            return took

    assert asyncio.run(go()) < 0.5


def test_metrics_count_requests_tokens_and_speculation(app: Any) -> None:
    post(app, "/v1/chat/completions", chat_body(max_tokens=8))
    text = request(app, "GET", "/metrics").text
    values = {
        line.split(" ")[0]: float(line.split(" ")[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }
    chat_ok = '{method="POST",route="/v1/chat/completions",status="200"}'
    assert values["specdecode_http_requests_total" + chat_ok] >= 1
    assert values["specdecode_generated_tokens_total"] >= 8
    assert values["specdecode_target_passes_total"] >= 1
    assert values["specdecode_tau"] > 1 and 0 < values["specdecode_alpha"] <= 1
    assert values["specdecode_tokens_per_second"] > 0
    assert values["specdecode_time_to_first_token_seconds_count"] >= 1
    assert values["specdecode_queue_capacity"] == 8


# ----------------------------------------------------------------------------- segments
def test_segments_cover_the_released_text_per_token(generator: SpeculativeGenerator) -> None:
    tokenizer = generator.target.tokenizer
    text = "Héllo wörld 你好 🙂 ok"
    ids = tokenizer(text)["input_ids"]
    tracker = SegmentTracker(tokenizer)
    stream = TextStream(tokenizer)
    pieces = []
    for start in range(0, len(ids), 3):  # rounds of 3 tokens: 2 drafted, 1 the target's
        chunk = ids[start : start + 3]
        released = stream.push(chunk).text
        got = tracker.push(chunk, [True, True, False][: len(chunk)], released)
        assert "".join(p.text for p in got) == released
        pieces += got
    tail = stream.flush()
    pieces += tracker.finish(tail)
    assert "".join(p.text for p in pieces) == text
    assert {p.from_draft for p in pieces} == {True, False}


def test_segments_carry_the_probability_of_their_text(generator: SpeculativeGenerator) -> None:
    """With log-probabilities, a piece carries its token's; a character spelt by several tokens
    carries their sum (its probability); without them, None."""
    tokenizer = generator.target.tokenizer
    ids = tokenizer("a 🙂 b")["input_ids"]
    values = [-0.1 * (i + 1) for i in range(len(ids))]
    tracker = SegmentTracker(tokenizer)
    stream = TextStream(tokenizer)
    pieces = tracker.push(ids, [False] * len(ids), stream.push(ids).text, logprobs=values)
    pieces += tracker.finish(stream.flush())
    assert "".join(p.text for p in pieces) == tokenizer.decode(ids)
    assert sum(p.logprob for p in pieces if p.logprob is not None) == pytest.approx(sum(values))
    emoji = next(p for p in pieces if "🙂" in p.text)  # its bytes take several tokens
    runs = [sum(values[i:j]) for i in range(len(ids)) for j in range(i + 2, len(ids) + 1)]
    assert any(emoji.logprob == pytest.approx(run) for run in runs)
    plain = SegmentTracker(tokenizer).push(ids, [False] * len(ids), tokenizer.decode(ids))
    assert all(p.logprob is None for p in plain)


def test_segments_mark_the_tokens_prompt_lookup_copied(generator: SpeculativeGenerator) -> None:
    """Drafted tokens of a lookup round are marked copied, also when their text is released in
    a later round; the target's own tokens never are (the stream's end to end: test_hybrid)."""
    tokenizer = generator.target.tokenizer
    ids = tokenizer("Héllo wörld 你好 🙂 ok, and more")["input_ids"]
    tracker = SegmentTracker(tokenizer)
    stream = TextStream(tokenizer)
    pieces = []
    for number, start in enumerate(range(0, len(ids), 3)):
        chunk = ids[start : start + 3]
        released = stream.push(chunk).text
        copied = number % 2 == 0  # lookup rounds and model rounds in turn
        origins = [True, True, False][: len(chunk)]
        pieces += tracker.push(chunk, origins, released, copied=copied)
    pieces += tracker.finish(stream.flush())
    assert "".join(p.text for p in pieces) == tokenizer.decode(ids)
    assert any(p.copied for p in pieces) and any(p.from_draft and not p.copied for p in pieces)
    assert all(p.from_draft for p in pieces if p.copied)


def test_the_stream_marks_copied_tokens_with_lookup_in_front(model_dir: Path) -> None:
    from specdecode import LookupDrafter

    target = load_model(model_dir / "target", device="cpu", threads=1)
    draft = load_model(model_dir / "draft", device="cpu")
    drafter = LookupDrafter(ModelDrafter(draft), min_ngram=1)  # copies often on a tiny model
    engine = Engine(SpeculativeGenerator(target, drafter, draft_length=4), max_queue=2, timeout=60)
    try:
        app = create_app(engine, ServerSettings(served_model_name=MODEL))
        messages = [{"role": "user", "content": "ab ab ab ab ab ab ab ab"}]
        body = chat_body(messages=messages, stream=True, max_tokens=48)
        chunks = [c for c in sse(post(app, "/v1/chat/completions", body)) if c["specdecode"]]
        segments = [s for c in chunks for s in c["specdecode"]["segments"]]
        keys = {"text", "from_draft", "copied", "logprob"}
        assert segments and all(set(s) == keys for s in segments)
        assert all(s["from_draft"] for s in segments if s["copied"])
        [stats] = [c["specdecode"]["stats"] for c in chunks if c["specdecode"]["stats"]]
        assert 0 < stats["free_drafted"] <= stats["drafted"]
        assert stats["free_accepted"] <= stats["accepted"]
    finally:
        engine.close()


# ----------------------------------------------------------------------------- review fixes
def test_a_busy_whole_response_still_notices_its_client_left() -> None:
    """A non-streaming request whose job sends an update every round (never idle) still checks
    on a clock that its client is there, and cancels the job when it is gone."""
    from specdecode.server.channel import Channel
    from specdecode.server.engine import ChoiceUpdate
    from specdecode.server.errors import APIError
    from specdecode.server.streaming import DISCONNECT_POLL_SECONDS, whole_response

    class GoneClient:
        async def is_disconnected(self) -> bool:
            return True

    cancelled: list[object] = []

    class Recorder:
        def cancel(self, job: object) -> None:
            cancelled.append(job)

    async def go() -> float:
        channel = Channel(asyncio.get_running_loop())
        update = ChoiceUpdate(0, "x", [1], [False], [], 1.0, 1.0)

        async def busy_worker() -> None:
            while True:
                channel.put(update)
                await asyncio.sleep(0.01)

        feeder = asyncio.create_task(busy_worker())
        started = time.perf_counter()
        try:
            with pytest.raises(APIError) as caught:
                await whole_response(GoneClient(), Recorder(), "job", channel, None)  # type: ignore[arg-type]
        finally:
            feeder.cancel()
        assert caught.value.status == 499
        return time.perf_counter() - started

    took = asyncio.run(go())
    assert took < 3 * DISCONNECT_POLL_SECONDS
    assert cancelled == ["job"]


@pytest.mark.parametrize(
    ("field", "value", "param"),
    [
        ("tools", [{"type": "function", "function": {"name": "f"}}], "tools"),
        ("tool_choice", "required", "tool_choice"),
        ("functions", [{"name": "f"}], "functions"),
        ("response_format", {"type": "xml"}, "response_format"),
        ("best_of", 3, "best_of"),
    ],
)
def test_chat_fields_that_would_change_the_answer_are_refused(
    app: Any, field: str, value: Any, param: str
) -> None:
    expect_error(post(app, "/v1/chat/completions", chat_body(**{field: value})), 400, param)


def test_harmless_values_of_those_fields_are_accepted(app: Any) -> None:
    body = chat_body(
        max_tokens=2, tool_choice="none", response_format={"type": "text"}, best_of=1, tools=[]
    )
    assert post(app, "/v1/chat/completions", body).status_code == 200
    named = [{"role": "user", "content": "hi", "name": "ada"}]
    assert post(app, "/v1/chat/completions", chat_body(messages=named, max_tokens=2)).is_success
    calls = [{"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]}]
    expect_error(
        post(app, "/v1/chat/completions", chat_body(messages=USER + calls)),
        400,
        "messages[1].tool_calls",
    )


@pytest.mark.parametrize(("field", "value"), [("suffix", "}"), ("best_of", 2)])
def test_completion_fields_that_would_change_the_answer_are_refused(
    app: Any, field: str, value: Any
) -> None:
    ask = {"model": MODEL, "prompt": "def f(", "max_tokens": 3, field: value}
    expect_error(post(app, "/v1/completions", ask), 400, field)
    assert post(app, "/v1/completions", {**ask, field: None}).is_success


SCHEMA = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer"}},
    "required": ["ok", "n"],
    "additionalProperties": False,
}


def test_constrained_output_is_the_loops_under_the_grammar(
    app: Any, generator: SpeculativeGenerator
) -> None:
    from specdecode.constraints import Grammar

    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA}}
    whole = post(app, "/v1/chat/completions", chat_body(max_tokens=40, response_format=fmt))
    assert whole.status_code == 200, whole.text
    text = whole.json()["choices"][0]["message"]["content"]
    ids = chat_ids(generator, USER)
    loop = generator.generate(ids, max_new_tokens=40, grammar=Grammar.json_schema(SCHEMA))
    assert text == loop.text
    if loop.finish_reason == "eos":
        assert set(json.loads(text)) == {"ok", "n"}
    streamed = sse(
        post(
            app, "/v1/chat/completions", chat_body(max_tokens=40, response_format=fmt, stream=True)
        )
    )
    assert (
        "".join(c["choices"][0]["delta"].get("content") or "" for c in streamed if c["choices"])
        == text
    )
    ask = {"model": MODEL, "prompt": "def f(", "max_tokens": 10}
    for structured, check in [
        ({"choice": ["alpha", "beta"]}, lambda t: t in ("alpha", "beta")),
        ({"regex": "[0-9]{3}"}, lambda t: len(t) == 3 and t.isdigit()),
        ({"grammar": 'start: "x" "y"+'}, lambda t: t.startswith("xy")),
        ({"json_object": True}, lambda t: t.lstrip().startswith("{")),
        ({"json": True}, lambda t: bool(t)),  # a boolean schema: any JSON value
    ]:
        answer = post(app, "/v1/completions", {**ask, "structured_outputs": structured})
        assert answer.status_code == 200, answer.text
        assert check(answer.json()["choices"][0]["text"]), (structured, answer.text)
    # vLLM's older names for the same fields
    guided = post(app, "/v1/completions", {**ask, "guided_choice": ["alpha", "beta"]})
    assert guided.json()["choices"][0]["text"] in ("alpha", "beta")


@pytest.mark.parametrize(
    ("fields", "param", "message"),
    [
        ({"structured_outputs": {"regex": "(ab"}}, "structured_outputs", "unclosed group"),
        ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs", "one of"),
        (
            {"structured_outputs": {"whitespace_pattern": " "}},
            "structured_outputs",
            "not supported",
        ),
        ({"structured_outputs": {"choice": "ab"}}, "structured_outputs.choice", "list of strings"),
        ({"structured_outputs": {"grammar": 3}}, "structured_outputs.grammar", "string"),
        ({"response_format": {"type": "json_schema"}}, "response_format", "schema"),
        (
            {"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}},
            "structured_outputs",
            "send one",
        ),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": 5}}}},
            "response_format",
            "not usable",
        ),
        ({"structured_outputs": {"regex": "x[a&&b]"}}, "structured_outputs", "can even begin"),
        (
            {"guided_regex": "a", "structured_outputs": {"regex": "b"}},
            "structured_outputs",
            "older",
        ),
        ({"guided_whitespace_pattern": " "}, "structured_outputs", "not supported"),
    ],
)
def test_grammars_that_cannot_work_are_400s(
    app: Any, fields: dict[str, Any], param: str, message: str
) -> None:
    error = expect_error(post(app, "/v1/chat/completions", chat_body(**fields)), 400, param)
    assert message in error


def test_penalties_and_bias_reach_the_loop(app: Any, generator: SpeculativeGenerator) -> None:
    fields = {"frequency_penalty": 1.5, "presence_penalty": 0.5, "logit_bias": {"9": 5.0}}
    ask = {"model": MODEL, "prompt": "def f(", "max_tokens": 12, **fields}
    body = post(app, "/v1/completions", ask).json()
    expected = generator.generate(
        "def f(",
        max_new_tokens=12,
        temperature=0,
        frequency_penalty=1.5,
        presence_penalty=0.5,
        logit_bias={9: 5.0},
    )
    assert body["choices"][0]["text"] == expected.text
    assert expected.text != generator.generate("def f(", max_new_tokens=12, temperature=0).text
    for bad in ({"logit_bias": {"x": 1}}, {"logit_bias": {"99999": 1}}):
        expect_error(post(app, "/v1/completions", {**ask, **bad}), 400, "logit_bias")
    streamed = {**ask, "logit_bias": {"99999": 1}, "stream": True}
    message = expect_error(post(app, "/v1/completions", streamed), 400, "logit_bias")  # not 200
    assert "outside the vocabulary" in message and "/" not in message  # no path on disk
    expect_error(post(app, "/v1/completions", {**ask, "presence_penalty": 2.5}), 422)


@pytest.mark.parametrize(
    "fields",
    [
        {"seed": 2**64, "temperature": 0.8},
        {"seed": -(2**63) - 1},
        {"temperature": 1e-39},
    ],
)
def test_extreme_numbers_are_answers_not_500s(app: Any, fields: dict[str, Any]) -> None:
    ask = {"model": MODEL, "prompt": "def f(", "max_tokens": 3, **fields}
    assert post(app, "/v1/completions", ask).status_code == 200


def test_numbers_that_cannot_work_are_clear_errors(app: Any) -> None:
    ask = {"model": MODEL, "prompt": "def f(", "max_tokens": 3}
    message = expect_error(post(app, "/v1/completions", {**ask, "repetition_penalty": 1e-46}), 400)
    assert "repetition_penalty" in message
    infinite = '{"model": "tiny", "prompt": "a", "repetition_penalty": Infinity}'
    response = request(
        app,
        "POST",
        "/v1/completions",
        content=infinite,
        headers={"content-type": "application/json"},
    )
    expect_error(response, 422, "repetition_penalty")


def test_lone_surrogates_and_form_bodies_are_400s_that_say_what_to_do(app: Any) -> None:
    lone = '{"model": "tiny", "prompt": "a\\ud800b"}'
    json_header = {"content-type": "application/json"}
    response = request(app, "POST", "/v1/completions", content=lone, headers=json_header)
    assert "surrogate" in expect_error(response, 400, "prompt")
    chat = '{"model": "tiny", "messages": [{"role": "user", "content": "\\udfff"}]}'
    response = request(app, "POST", "/v1/chat/completions", content=chat, headers=json_header)
    assert "surrogate" in expect_error(response, 400, "messages[0].content")
    form = request(app, "POST", "/v1/completions", content='{"model": "tiny", "prompt": "a"}')
    assert "Content-Type: application/json" in expect_error(form, 400)
    parts = chat_body(messages=[{"role": "user", "content": [{"type": "text"}]}])
    assert '"text" field' in expect_error(post(app, "/v1/chat/completions", parts), 400)


def test_a_special_token_as_stop_string_ends_the_answer(generator: SpeculativeGenerator) -> None:
    """``stop: ["<|im_end|>"]``: the text is decoded without special tokens, so the stop becomes
    an end-of-sequence id instead of a string that could never match."""
    tokenizer = generator.target.tokenizer
    special = tokenizer.eos_token  # a special token the tiny tokenizer has
    token = tokenizer.convert_tokens_to_ids(special)
    forced = {token: 100.0}
    result = generator.generate(
        "def f(", max_new_tokens=8, eos_token_id=[], logit_bias=forced, stop=[special]
    )
    assert result.token_ids == [token] and result.finish_reason == "eos"
