"""A real ``specdecode serve`` process on 127.0.0.1: the official ``openai`` client, a load test
with 32 concurrent streams, and the page in headless Chromium.

One server for the module (a tiny llama target, a slightly perturbed copy as the draft, an API
key from the environment), started on a free loopback port.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from specdecode.cli.main import main as cli_main
from specdecode.cli.serve import api_keys, default_model_name

from .test_server import tiny_models

MODEL = "tiny-live"
KEY = "sk-live-test"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_QUEUE = 40  # the 34 clients of the load test fit with room to spare; the flood does not
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"


@dataclass
class LiveServer:
    url: str
    process: subprocess.Popen[bytes]
    log: Path

    def rss_mib(self) -> float:
        """Resident memory of the server process (Linux /proc)."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise AssertionError("no VmRSS in /proc status")

    def metrics(self) -> dict[str, float]:
        text = httpx.get(self.url + "/metrics", headers=AUTH, timeout=10).text
        return {
            line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line and not line.startswith("#")
        }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_healthy(server: LiveServer, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            pytest.fail(f"the server exited: {server.log.read_text()[-3000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(server.url + "/health", timeout=2).status_code == 200:
                return
        time.sleep(0.2)
    pytest.fail(f"the server did not start in {seconds} s: {server.log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    models, root = tiny_models(tmp_path_factory), tmp_path_factory.mktemp("live-server")
    port = _free_port()
    command = [
        sys.executable, "-m", "specdecode.cli.main", "serve",
        "--target", str(models / "target"), "--draft", str(models / "draft"), "-k", "4",
        "--draft-schedule", "constant",  # the auto schedule may stop drafting on these timings
        "--threads", "1", "--host", "127.0.0.1", "--port", str(port),
        "--served-model-name", MODEL, "--max-queue", str(MAX_QUEUE), "--timeout", "60",
        "--log-level", "warning",
    ]  # fmt: skip
    env = {**os.environ, "SPECDECODE_API_KEY": KEY, "OMP_NUM_THREADS": "1"}
    log = root / "server.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(command, env=env, stdout=sink, stderr=subprocess.STDOUT)
    live = LiveServer(f"http://127.0.0.1:{port}", process, log)
    try:
        _wait_healthy(live, 90)
        yield live
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


@pytest.fixture
def client(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


# ----------------------------------------------------------------------------- the CLI
def test_serve_cli_checks_settings_before_loading(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["serve", "--target", "/nonexistent", "--max-queue", "0"]) == 2
    assert "--max-queue" in capsys.readouterr().err
    assert cli_main(["serve", "--target", "x", "--default-temperature", "5"]) == 2
    assert "default_temperature" in capsys.readouterr().err
    assert default_model_name(str(ARTIFACTS.parent / "src") + "/") == "src"
    assert default_model_name(str(ARTIFACTS.parent / "pyproject.toml")) == "pyproject"
    assert default_model_name("org/name") == "org/name"
    assert api_keys(["a"], " b, ,a,c") == ("a", "b", "c")


# ----------------------------------------------------------------------------- openai client
def test_openai_client_chat(client: openai.OpenAI, server: LiveServer) -> None:
    cached_before = server.metrics().get("specdecode_prompt_tokens_cached_total", 0.0)
    assert [m.id for m in client.models.list()] == [MODEL]
    messages: Any = [{"role": "user", "content": "Speculative decoding drafts tokens"}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16)
    answer = whole.choices[0].message.content
    assert answer and whole.choices[0].finish_reason in ("stop", "length")
    assert whole.usage is not None and 0 < whole.usage.completion_tokens <= 16
    extra = whole.model_extra or {}
    assert extra["specdecode"]["stats"]["tau"] > 1  # the draft is accepted at times

    stream = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=16,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == answer
    usage = chunks[-1].usage
    assert usage is not None and usage.prompt_tokens_details is not None
    assert (usage.prompt_tokens, usage.completion_tokens) == (
        whole.usage.prompt_tokens,  # type: ignore[union-attr]
        whole.usage.completion_tokens,  # type: ignore[union-attr]
    )
    # the server keeps the KV cache of the same prompt's positions but the last (which gives
    # the first token), and the answer is the same
    assert usage.prompt_tokens_details.cached_tokens == usage.prompt_tokens - 1
    cached = server.metrics()["specdecode_prompt_tokens_cached_total"] - cached_before
    assert cached >= usage.prompt_tokens_details.cached_tokens


def test_openai_client_completions_and_errors(client: openai.OpenAI) -> None:
    whole = client.completions.create(model=MODEL, prompt="def add(a, b):", max_tokens=12)
    stream = client.completions.create(
        model=MODEL, prompt="def add(a, b):", max_tokens=12, stream=True
    )
    assert "".join(c.choices[0].text for c in stream) == whole.choices[0].text
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4o", prompt="x", max_tokens=2)
    with pytest.raises(openai.UnprocessableEntityError):
        client.completions.create(model=MODEL, prompt="x", max_tokens=-1)
    with pytest.raises(openai.BadRequestError, match="scores a prompt"):  # 0: only with echo
        client.completions.create(model=MODEL, prompt="x", max_tokens=0)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt=[10**6], max_tokens=2)
    wrong = client.with_options(api_key="sk-wrong")
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()


def test_openai_client_constrained_output(client: openai.OpenAI) -> None:
    schema = {
        "type": "object",
        "properties": {"n": {"type": "integer"}},
        "required": ["n"],
        "additionalProperties": False,
    }
    messages = [{"role": "user", "content": "A number as JSON"}]
    reply = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=40,
        response_format={"type": "json_schema", "json_schema": {"name": "n", "schema": schema}},
    )
    text = reply.choices[0].message.content or ""
    assert text.lstrip().startswith("{")
    if reply.choices[0].finish_reason == "stop":
        assert set(json.loads(text)) == {"n"}
    picked = client.completions.create(
        model=MODEL,
        prompt="def add(a, b):",
        max_tokens=8,
        extra_body={"structured_outputs": {"choice": ["yes", "no"]}},
    )
    assert picked.choices[0].text in ("yes", "no")
    with pytest.raises(openai.BadRequestError, match="unclosed group"):
        client.completions.create(
            model=MODEL, prompt="x", max_tokens=2, extra_body={"structured_outputs": {"regex": "("}}
        )


# ----------------------------------------------------------------------------- load
PROMPTS = ["def add(a, b):", "The quick brown fox", "import torch\n", "for i in range(10):"]
LOAD_TOKENS = 20


async def _answer(http: httpx.AsyncClient, prompt: str) -> str:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": LOAD_TOKENS}
    response = await http.post("/v1/completions", json=body)
    response.raise_for_status()
    return str(response.json()["choices"][0]["text"])


async def _stream(http: httpx.AsyncClient, prompt: str) -> str:
    """A whole stream: checks every frame, returns the text."""
    body = {"model": MODEL, "prompt": prompt, "max_tokens": LOAD_TOKENS, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    frames: list[str] = []
    async with http.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                frames.append(line[len("data: ") :])
    assert frames[-1] == "[DONE]"
    chunks = [json.loads(f) for f in frames[:-1]]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 0
    return "".join(c["choices"][0]["text"] for c in chunks[:-1])


async def _drop(http: httpx.AsyncClient, prompt: str, frames: int) -> None:
    """Start a long stream and go away after ``frames`` frames."""
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 400, "stream": True}
    async with http.stream("POST", "/v1/completions", json=body) as response:
        seen = 0
        async for line in response.aiter_lines():
            seen += line.startswith("data: ")
            if seen >= frames:
                break


async def _give_up_waiting(server: LiveServer) -> None:
    """A non-streaming request whose client stops waiting while it is queued."""
    body = {"model": MODEL, "prompt": PROMPTS[3], "max_tokens": 400}
    timeout = httpx.Timeout(10, read=0.3)  # connects, sends, then stops waiting
    async with httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=timeout) as http:
        # Join the queue behind the streams, so that the wait outlasts 0.3 s on a fast machine.
        for _ in range(200):
            if (await http.get("/health")).json()["waiting"] >= 16:
                break
            await asyncio.sleep(0.01)
        with pytest.raises(httpx.ReadTimeout):
            await http.post("/v1/completions", json=body)


async def _flood(http: httpx.AsyncClient, count: int) -> list[httpx.Response]:
    """``count`` long streams at once; each holds on until all have an answer, then drops."""
    answered: list[httpx.Response] = []
    everyone = asyncio.Event()

    async def one() -> None:
        body = {"model": MODEL, "prompt": PROMPTS[0], "max_tokens": 300, "stream": True}
        async with http.stream("POST", "/v1/completions", json=body) as response:
            answered.append(response)
            if len(answered) == count:
                everyone.set()
            await asyncio.wait_for(everyone.wait(), 30)

    await asyncio.gather(*(one() for _ in range(count)))
    return answered


def _client(server: LiveServer) -> httpx.AsyncClient:
    """A client with fresh connections: never one the server may be closing for idleness."""
    limits = httpx.Limits(max_connections=100, max_keepalive_connections=100)
    return httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=60, limits=limits)


async def _load(server: LiveServer) -> None:
    async with _client(server) as http:
        answers = {p: await _answer(http, p) for p in PROMPTS}
    rss_before = server.rss_mib()

    # 32 streaming clients, one that drops mid-stream and one that stops waiting, all at once.
    async with _client(server) as http:
        drops = [_drop(http, PROMPTS[1], frames=3), _give_up_waiting(server)]
        streams = [_stream(http, PROMPTS[i % len(PROMPTS)]) for i in range(32)]
        results = await asyncio.gather(*drops, *streams)
    for i, text in enumerate(results[len(drops) :]):
        assert text == answers[PROMPTS[i % len(PROMPTS)]], i  # greedy: same as not streamed

    # More streams than the queue holds: the rest are told to come back later.
    async with _client(server) as http:
        flood = await _flood(http, MAX_QUEUE + 12)
    refused = [r for r in flood if r.status_code == 429]
    assert refused and all(r.status_code in (200, 429) for r in flood)
    assert all(int(r.headers["Retry-After"]) >= 1 for r in refused)

    # Healthy afterwards: the queue drains (the flood's clients left), answers are right.
    async with _client(server) as http:
        for _ in range(100):
            health = (await http.get("/health")).json()
            if health["waiting"] == 0 and health["running"] == 0:
                break
            await asyncio.sleep(0.1)
        assert health == {"status": "ok", "model": MODEL, "waiting": 0, "running": 0}
        assert await _answer(http, PROMPTS[2]) == answers[PROMPTS[2]]
    growth = server.rss_mib() - rss_before
    print(f"server RSS {rss_before:.0f} MiB before the load, grew by {growth:.1f} MiB")
    assert growth < 64, f"server memory grew by {growth:.0f} MiB under load"


def test_load_32_streams_a_drop_and_a_full_queue(server: LiveServer) -> None:
    before = server.metrics()
    started = time.perf_counter()
    asyncio.run(_load(server))
    took = time.perf_counter() - started
    after = server.metrics()

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert delta('specdecode_requests_rejected_total{reason="queue_full"}') >= 1
    assert delta('specdecode_requests_cancelled_total{reason="client_disconnected"}') >= 2
    # The dropped and flooded streams stopped early instead of running to 300-400 tokens.
    finished = 32 + len(PROMPTS) + 1  # the drop's and the flood's first rounds: < 200 more
    assert delta("specdecode_generated_tokens_total") < finished * LOAD_TOKENS + 200
    assert took < 60


# ----------------------------------------------------------------------------- the page
def _chrome(user_data: Path) -> Any:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if chromium is None or driver_path is None:
        pytest.skip("headless Chromium is not installed (apt-get install chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--window-size=1100,900", f"--user-data-dir={user_data}",
    ):  # fmt: skip
        options.add_argument(flag)
    service = webdriver.ChromeService(executable_path=driver_path)
    return webdriver.Chrome(options=options, service=service)


@pytest.mark.browser
def test_page_streams_and_marks_draft_tokens(server: LiveServer, tmp_path: Path) -> None:
    driver = _chrome(tmp_path / "chromium-profile")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        driver.get(server.url + "/")
        wait = WebDriverWait(driver, 60)
        driver.find_element(By.ID, "api-key").send_keys(KEY, Keys.TAB)
        wait.until(lambda d: d.find_element(By.ID, "model").text == MODEL)
        tokens = driver.find_element(By.ID, "max-tokens")
        tokens.clear()
        tokens.send_keys("64")
        driver.find_element(By.ID, "prompt").send_keys("Speculative decoding drafts", Keys.ENTER)
        answer = wait.until(
            lambda d: d.find_element(By.CSS_SELECTOR, '.msg.assistant[data-done="true"]')
        )
        drafted = answer.find_elements(By.CSS_SELECTOR, ".tok.draft")
        own = answer.find_elements(By.CSS_SELECTOR, ".tok.target")
        assert drafted and own, "both draft-accepted and target tokens are marked"
        assert "probability" in drafted[0].get_attribute("title")  # the page asks for logprobs
        stats = answer.find_element(By.CLASS_NAME, "stats").text
        assert "tau" in stats and "tok/s" in stats and "finish: " in stats
        assert not driver.find_elements(By.CSS_SELECTOR, ".msg.error")
        ARTIFACTS.mkdir(exist_ok=True)
        shot = ARTIFACTS / "server-page.png"
        assert driver.save_screenshot(str(shot))
        print(f"screenshot: {shot}")
    finally:
        driver.quit()
