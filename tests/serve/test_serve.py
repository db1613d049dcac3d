"""The HTTP API against a live server on 127.0.0.1, through the official openai client:
plain, streamed, with images, embeddings, errors, 16 clients at once, disconnects, and
the chat page in a real headless Chromium."""

import base64
import contextlib
import io
import re
import shutil
import socket
import threading
import time

import httpx
import pytest
import torch
from PIL import Image

from conftest import tiny_model
from polymodal.engine.generate import Engine
from polymodal.engine.sampling import SamplingParams

openai = pytest.importorskip("openai")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LiveServer:
    """uvicorn on a thread, on a free loopback port."""

    def __init__(self, app):
        import uvicorn

        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        for _ in range(200):
            if self.server.started:
                return self
            time.sleep(0.05)
        raise RuntimeError("server did not start")

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def sharp_tiny_model():
    model = tiny_model({"kind": "hf", "source": "tiny:clip"}, {"kind": "mlp"}, {"source": "tiny:llama"})
    with torch.no_grad():  # a sharper random model: greedy choices are not near-ties
        model.llm.model.get_output_embeddings().weight.mul_(8)
    return model


@contextlib.contextmanager
def live_server(model, name: str, max_batch: int = 4, max_queue: int = 16, limits=None, **app_options):
    """A live server of `model` (served as `name`) behind a started `BatchingEngine`, the
    engine stopped on exit; the server carries `.model` and `.engine`. `limits`: the
    `MediaLimits` (default ones unless given); `app_options` go to `create_app`."""
    from polymodal.engine.batching import BatchingEngine
    from polymodal.serve.app import create_app
    from polymodal.serve.media import MediaLimits

    engine = BatchingEngine(model, max_batch=max_batch, max_queue=max_queue).start()
    app = create_app(model, name, engine, limits or MediaLimits(), **app_options)
    try:
        with LiveServer(app) as server:
            server.model, server.engine = model, engine
            yield server
    finally:
        engine.stop()


@contextlib.contextmanager
def tiny_server(max_queue: int):
    """A live server of `sharp_tiny_model` (batch 4, images up to 1000x1000, bodies to 2 MiB)."""
    from polymodal.serve.media import MediaLimits

    limits = MediaLimits(max_image_pixels=1000 * 1000, max_images=2)
    with live_server(sharp_tiny_model(), "tiny", max_queue=max_queue, limits=limits,
                     max_body_bytes=2 * 1024 * 1024) as server:
        yield server


@pytest.fixture(scope="module")
def served():
    with tiny_server(max_queue=64) as server:
        yield server


def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def png_uri(colour=(200, 30, 30), size=(32, 32)) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def expected(model, text: str, image_uri: str | None = None, max_tokens: int = 10) -> str:
    """What the model answers alone, through the one generation path."""
    images = []
    if image_uri:
        images = [Image.open(io.BytesIO(base64.b64decode(image_uri.split(",", 1)[1]))).convert("RGB")]
    content = ("<image>" if image_uri else "") + text
    prompt = {"messages": [{"role": "user", "content": content}], "images": images}
    return Engine(model).generate([prompt], SamplingParams(max_new_tokens=max_tokens))[0].text


def image_message(text: str, uri: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}},
                                         {"type": "text", "text": text}]}]


def test_plain_streamed_and_image_chat_through_the_openai_client(served):
    api = client(served)
    plain = api.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hello there"}],
                                        max_tokens=10, temperature=0)
    assert plain.choices[0].message.content == expected(served.model, "Hello there")
    assert plain.usage.completion_tokens >= 1 and plain.usage.prompt_tokens > 3
    assert plain.usage.total_tokens == plain.usage.prompt_tokens + plain.usage.completion_tokens
    pieces = [c.choices[0].delta.content or "" for c in api.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Hello there"}], max_tokens=10, temperature=0,
        stream=True) if c.choices]
    assert "".join(pieces) == plain.choices[0].message.content and len(pieces) > 2
    uri = png_uri()
    answer = api.chat.completions.create(model="tiny", messages=image_message("What colour?", uri),
                                         max_completion_tokens=10, temperature=0)
    assert answer.choices[0].message.content == expected(served.model, "What colour?", uri)
    several = api.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                          max_tokens=6, temperature=1.0, seed=3, n=2)
    assert [c.index for c in several.choices] == [0, 1]
    again = api.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                        max_tokens=6, temperature=1.0, seed=3, n=2)
    assert [c.message.content for c in again.choices] == [c.message.content for c in several.choices]
    assert [m.id for m in api.models.list().data] == ["tiny"]


def test_sixteen_clients_at_once_get_their_sequential_answers(served):
    questions = [f"Question number {i}: what is it?" for i in range(16)]
    uris = [png_uri((i * 15, 255 - i * 15, 90)) for i in range(16)]
    wanted = [expected(served.model, q, u) for q, u in zip(questions, uris)]
    answers = [None] * 16

    def ask(i):
        answers[i] = client(served).chat.completions.create(
            model="tiny", messages=image_message(questions[i], uris[i]), max_tokens=10,
            temperature=0).choices[0].message.content

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert answers == wanted


BAD_INPUTS = [
    ({"messages": []}, 400, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": 5}, 400, "temperature"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role"),
    ({"messages": image_message("x", "data:image/png;base64,@@@notbase64@@@")}, 400, "invalid base64"),
    ({"messages": image_message("x", "data:application/pdf;base64,AAAA")}, 415, "unsupported media type"),
    ({"messages": image_message("x", "data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"0" * 50)
                                .decode())}, 400, "unreadable image"),
    ({"messages": image_message("x", png_uri()[:-40])}, 400, "corrupt or truncated"),
    ({"messages": image_message("x", png_uri(size=(1200, 1000)))}, 400, "1200×1000 pixels"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": png_uri()}}] * 3}]},
     400, "too many images"),
    ({"messages": image_message("x", "file:///etc/passwd")}, 400, "file:// image URLs are refused"),
    ({"messages": image_message("x", "https://example.com/cat.png")}, 400, "remote image URLs are disabled"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10 ** 6}, 400, "exceeds the context of"),
]


@pytest.mark.parametrize("body, status, says", BAD_INPUTS)
def test_bad_requests_get_openai_errors_and_the_server_stays_healthy(served, body, status, says):
    response = httpx.post(f"{served.url}/v1/chat/completions", json={"model": "tiny", **body}, timeout=30)
    assert response.status_code == status
    error = response.json()["error"]
    assert says in error["message"] or says == error["param"]
    assert set(error) == {"message", "type", "param", "code"}
    assert "Traceback" not in error["message"] and "/work" not in error["message"]
    assert not re.search(r"0x[0-9a-f]{6,}", error["message"])  # no memory address
    assert httpx.get(f"{served.url}/health").json()["status"] == "ok"


def test_invalid_json_oversized_body_and_queue_full(served, monkeypatch):
    bad = httpx.post(f"{served.url}/v1/chat/completions", content=b"{not json", timeout=10,
                     headers={"content-type": "application/json"})
    assert bad.status_code == 400 and "not valid JSON" in bad.json()["error"]["message"]
    big = httpx.post(f"{served.url}/v1/chat/completions", content=b"x" * (3 * 1024 * 1024), timeout=10)
    assert big.status_code == 413 and "over" in big.json()["error"]["message"]
    from polymodal.engine.batching import QueueFull

    def full(*args, **kwargs):
        raise QueueFull("busy")

    monkeypatch.setattr(served.engine, "submit_many", full)
    busy = httpx.post(f"{served.url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    assert busy.status_code == 429 and busy.headers["retry-after"] == "1"
    assert busy.json()["error"]["code"] == "queue_full"


def test_the_engine_queue_has_a_limit():
    from polymodal.engine.batching import BatchingEngine, QueueFull

    engine = BatchingEngine(sharp_tiny_model(), max_batch=1, max_queue=2)  # not started: nothing drains
    prompt = {"messages": [{"role": "user", "content": "hi"}]}
    engine.submit(prompt, SamplingParams(max_new_tokens=4))
    engine.submit(prompt, SamplingParams(max_new_tokens=4))
    with pytest.raises(QueueFull):
        engine.submit(prompt, SamplingParams(max_new_tokens=4))


def test_a_client_that_disconnects_frees_its_slot_within_a_second(served, monkeypatch):
    step = served.engine.cache.step

    def slow_step(tokens):  # 20 ms a token: the 400-token greedy answer (no EOS) takes 8 s
        time.sleep(0.02)
        return step(tokens)

    monkeypatch.setattr(served.engine.cache, "step", slow_step)
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Tell me a long story"}],
            "max_tokens": 400, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{served.url}/v1/chat/completions", json=body, timeout=30) as response:
        content = (line for line in response.iter_lines() if '"content": "' in line and '"content": ""' not in line)
        next(content), next(content)  # two pieces of the answer: it is running
        assert served.engine.running == 1
    closed = time.perf_counter()
    while served.engine.running and time.perf_counter() < closed + 1.0:
        time.sleep(0.02)
    assert served.engine.running == 0


def test_health_and_metrics(served):
    assert httpx.get(f"{served.url}/health").json()["status"] == "ok"
    text = httpx.get(f"{served.url}/metrics").text
    assert "polymodal_requests_total" in text and "polymodal_request_seconds_bucket" in text
    assert "polymodal_queue_depth" in text and "polymodal_completion_tokens_total" in text


def test_embeddings_from_a_dual_encoder_server():
    from polymodal.config import ModelConfig, from_dict
    from polymodal.contrastive.model import DualEncoder
    from polymodal.serve.app import create_app
    from polymodal.serve.media import MediaLimits

    config = from_dict(ModelConfig, {"kind": "dual-encoder", "encoder": {"kind": "cnn", "image_size": 32,
                                                                            "channels": [8, 16]},
                                     "contrastive": {"text": "tiny:bert", "dim": 16}})
    model = DualEncoder.from_config(config).eval()
    with LiveServer(create_app(model, "clip", None, MediaLimits())) as server:
        api = client(server)
        image_part = {"type": "image_url", "image_url": {"url": png_uri()}}
        result = api.embeddings.create(model="clip", input=["a red circle", image_part])
        assert [len(d.embedding) for d in result.data] == [16, 16]
        with torch.no_grad():
            want = model.encode_texts(["a red circle"])[0]
        assert torch.allclose(torch.tensor(result.data[0].embedding), want, atol=1e-5)
        with pytest.raises(openai.BadRequestError, match="does not generate"):
            api.chat.completions.create(model="clip", messages=[{"role": "user", "content": "hi"}])


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed")
def test_the_chat_page_streams_an_answer_in_a_real_browser(served, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    image = tmp_path / "red.png"
    Image.new("RGB", (32, 32), (200, 30, 30)).save(image)
    want = expected(served.model, "What colour?", png_uri(), max_tokens=64)
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=shutil.which("chromium"),
                                             args=["--no-sandbox", "--headless=new"])
        page = browser.new_page()
        requests = []
        page.on("request", lambda r: requests.append(r.url))
        page.goto(served.url + "/")
        page.set_input_files("#image", str(image))
        page.fill("#question", "What colour?")
        page.click("#send")
        page.wait_for_selector("[data-done=true]", timeout=30000)
        answer = page.inner_text(".assistant span")
        browser.close()
    assert answer == "model: " + want
    assert all(url.startswith(served.url) for url in requests)  # nothing from a CDN


def test_remote_images_only_from_allowlisted_hosts_with_every_redirect_checked(tmp_path):
    """A local HTTP server stands in for a remote host: 127.0.0.1 is fetched only when the
    allowlist names that address; a redirect to a host off the list is refused."""
    import functools
    import http.server

    from polymodal.serve.errors import APIError
    from polymodal.serve.media import MediaLimits, decode_image

    Image.new("RGB", (8, 8), (0, 90, 200)).save(tmp_path / "blue.png")
    (tmp_path / "big.png").write_bytes(b"x" * 5000)

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):  # the http.server interface names it so
            if self.path == "/hop":
                self.send_response(302)
                self.send_header("Location", f"http://localhost:{self.server.server_port}/blue.png")
                self.end_headers()
                return
            super().do_GET()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(tmp_path)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_port}"
    try:
        with pytest.raises(APIError, match="remote image URLs are disabled"):
            decode_image(f"{base}/blue.png", MediaLimits(), "p")
        allowed = MediaLimits(allowed_hosts={f"127.0.0.1:{server.server_port}"}, max_image_bytes=4000)
        assert decode_image(f"{base}/blue.png", allowed, "p").size == (8, 8)
        with pytest.raises(APIError, match="'localhost' is not allowed"):
            decode_image(f"{base}/hop", allowed, "p")  # the redirect leaves the allowlist
        with pytest.raises(APIError, match="resolves to a non-public address"):
            decode_image(f"http://localhost:{server.server_port}/blue.png",
                         MediaLimits(allowed_hosts={f"localhost:{server.server_port}"}), "p")  # a name
        with pytest.raises(APIError, match="over the 4000 byte limit"):
            decode_image(f"{base}/big.png", allowed, "p")
    finally:
        server.shutdown()


def test_a_failing_step_fails_its_requests_and_the_engine_keeps_serving():
    from polymodal.engine.batching import BatchingEngine

    engine = BatchingEngine(sharp_tiny_model(), max_batch=2).start()
    step = engine.cache.step
    engine.cache.step = lambda tokens: 1 / 0
    prompt = {"messages": [{"role": "user", "content": "hi"}]}
    events = list(engine.submit(prompt, SamplingParams(max_new_tokens=8)).events(timeout=10))
    assert events[-1][0] == "error" and engine.running == 0
    engine.cache.step = step
    events = list(engine.submit(prompt, SamplingParams(max_new_tokens=8)).events(timeout=10))
    assert events[-1][0] == "done" and events[-1][1].completion_tokens >= 1
    engine.stop()
