"""Issue 21's server faults, each as a kind: one request never harms others or the server;
the OpenAI API as clients send it; slow connections and remote images bounded."""

import base64
import socket
import struct
import threading
import time

import httpx
import pytest
import torch
from test_serve import LiveServer, client, free_port, png_uri, sharp_tiny_model, tiny_server

from polymodal.engine.sampling import SamplingParams, choice_seed, choose_next

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def served():
    with tiny_server(max_queue=8) as server:
        yield server


def post(server, body: dict, path: str = "/v1/chat/completions") -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json={"model": "tiny", **body}, timeout=60)


def hello(**extra) -> dict:
    return {"messages": [{"role": "user", "content": "Hello there"}], **extra}


def long_stream(server, results: list, max_tokens: int = 60):
    """A streamed request on a thread; appends the collected text and whether it ended well."""
    def run():
        pieces, failed = [], False
        body = {"model": "tiny", **hello(max_tokens=max_tokens, temperature=0, stream=True)}
        with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=60) as response:
            for line in response.iter_lines():
                failed |= "generation failed" in line
                if line:
                    pieces.append(line)
        results.append((pieces, failed))
    thread = threading.Thread(target=run)
    thread.start()
    return thread


# ---------------------------------------------------------------- section 4: one request alone

@pytest.mark.parametrize("extra, field", [({"seed": 2**64}, "seed"), ({"seed": -(2**63) - 1}, "seed"),
                                          ({"n": 2, "seed": 2**70}, "seed"), ({"top_p": 1.5}, "top_p"),
                                          ({"temperature": -1}, "temperature"), ({"n": 0}, "n"),
                                          ({"max_tokens": 0}, "max_tokens"),
                                          ({"top_logprobs": 21, "logprobs": True}, "top_logprobs")])
def test_a_requests_own_bad_parameter_is_a_400_naming_it_and_streams_nearby_finish(served, extra, field):
    results = []
    thread = long_stream(served, results)
    response = post(served, hello(**extra))
    thread.join(timeout=60)
    assert response.status_code == 400 and response.json()["error"]["param"] == field
    [(lines, failed)] = results
    assert not failed and lines[-1] == "data: [DONE]"
    assert httpx.get(f"{served.url}/health").json()["status"] == "ok"


def test_engine_errors_become_http_answers_by_their_type_not_their_text(served, monkeypatch):
    from polymodal.engine.batching import QueueFull
    from polymodal.errors import ConfigError, ContextLengthError, UserError
    from polymodal.serve.errors import request_field

    cases = [(ContextLengthError(10, 5, 12), 400, "context_length_exceeded", "max_tokens"),
             (UserError("the prompt (9 tokens) plus max_tokens (5) exceeds the context of 12 tokens"),
              400, None, "messages"),
             (ConfigError("top_k must be at least 0, got -1", "top_k"), 400, None, "top_k"),
             (QueueFull("context_length_exceeded"), 429, "queue_full", None),
             (RuntimeError("the context of 12 tokens"), 500, None, None)]
    for error, status, code, param in cases:
        def submit_many(*args, error=error, **kwargs):
            raise error

        monkeypatch.setattr(served.engine, "submit_many", submit_many)
        response = post(served, hello(max_tokens=5))
        assert response.status_code == status, error
        assert (response.json()["error"]["code"], response.json()["error"]["param"]) == (code, param)
    assert request_field(ConfigError("max_new_tokens must be at least 1", "max_new_tokens"),
                         "max_completion_tokens") == "max_completion_tokens"


def test_the_largest_seed_with_n_two_wraps_and_the_second_choice_is_seed_zeros(served):
    api = client(served)
    ask = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8,
           "temperature": 1.0}
    wrapped = api.chat.completions.create(seed=2**64 - 1, n=2, **ask)
    zero = api.chat.completions.create(seed=0, **ask)
    assert wrapped.choices[1].message.content == zero.choices[0].message.content
    assert choice_seed(-1, 1) == 0 and choice_seed(5, 2) == 7


def test_any_error_in_one_row_fails_that_request_alone_and_the_log_says_why(monkeypatch, caplog):
    from polymodal.engine import batching

    engine = batching.BatchingEngine(sharp_tiny_model(), max_batch=3).start()
    try:
        prompt = {"messages": [{"role": "user", "content": "hi"}]}
        real_entry = batching.logprob_entry

        def broken_entry(tokenizer, logits, token, top):  # fails for the row that asks for logprobs
            raise RuntimeError("boom")

        monkeypatch.setattr(batching, "logprob_entry", broken_entry)
        good = engine.submit(prompt, SamplingParams(max_new_tokens=20, ignore_eos=True))
        bad_row = engine.submit(prompt, SamplingParams(max_new_tokens=20, logprobs=True))
        bad_seed = SamplingParams(max_new_tokens=20)
        bad_seed.seed = 2**64  # past validation, as a caller bypassing it would
        bad_start = engine.submit(prompt, bad_seed)
        assert [e[0] for e in bad_row.events(timeout=30)][-1] == "error"
        assert [e[0] for e in bad_start.events(timeout=30)][-1] == "error"
        logged = [record for record in caplog.records if record.name == "polymodal.engine.batching"]
        assert any("boom" in record.getMessage() and record.exc_info for record in logged)  # the 500's cause
        events = list(good.events(timeout=30))
        assert events[-1][0] == "done" and events[-1][1].completion_tokens == 20
        monkeypatch.setattr(batching, "logprob_entry", real_entry)
        again = list(engine.submit(prompt, SamplingParams(max_new_tokens=5, logprobs=True)).events(timeout=30))
        assert again[-1][0] == "done" and engine.running == 0
    finally:
        engine.stop()


def test_a_requests_choices_are_queued_all_or_none():
    from polymodal.engine.batching import BatchingEngine, QueueFull
    from polymodal.serve.app import create_app
    from polymodal.serve.media import MediaLimits

    engine = BatchingEngine(sharp_tiny_model(), max_batch=1, max_queue=3)  # not started: nothing drains
    prompt = {"messages": [{"role": "user", "content": "hi"}]}
    first = engine.submit_many(prompt, [SamplingParams(max_new_tokens=4)] * 2)
    with pytest.raises(QueueFull):
        engine.submit_many(prompt, [SamplingParams(max_new_tokens=4)] * 2)
    assert engine.queue_depth == 2  # none of the refused request's choices stayed
    with LiveServer(create_app(engine.model, "tiny", engine, MediaLimits())) as server:
        busy = post(server, hello(n=2))
        assert busy.status_code == 429 and engine.queue_depth == 2
        too_many = post(server, hello(n=4))
        assert too_many.status_code == 400 and too_many.json()["error"]["param"] == "n"
        for request in first:  # cancelled requests give their places back at once
            request.cancel()
        engine.submit_many(prompt, [SamplingParams(max_new_tokens=4)] * 3)
        assert engine.queue_depth == 3
    engine.stop()  # waiting requests get an answer, not silence
    assert first[0].queue.get(timeout=5)[0] == "done"


def test_slow_image_work_runs_off_the_event_loop(served, monkeypatch):
    from polymodal.serve import chat

    started, release = threading.Event(), threading.Event()
    decode = chat.decode_image

    def slow_decode(*args):  # blocks its thread until the test lets it go
        started.set()
        release.wait(30)
        return decode(*args)

    monkeypatch.setattr(chat, "decode_image", slow_decode)
    answer = []
    body = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": png_uri()}},
                                                      {"type": "text", "text": "colour?"}]}],
            "max_tokens": 4, "temperature": 0}
    thread = threading.Thread(target=lambda: answer.append(post(served, body)))
    thread.start()
    assert started.wait(30)
    try:
        health = httpx.get(f"{served.url}/health", timeout=20)  # answered while the decode is blocked
        assert health.status_code == 200 and not answer
    finally:
        release.set()
        thread.join(30)
    assert answer[0].status_code == 200


# ---------------------------------------------------------------- section 5: the API as sent

def test_null_means_not_given_for_every_optional_field(served):
    api = client(served)
    given = api.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hello there"}],
                                        max_tokens=10, temperature=0)
    nulls = post(served, hello(max_tokens=10, temperature=0, top_p=None, n=None, stream=None, seed=None,
                               stop=None, stream_options=None, max_completion_tokens=None, logprobs=None,
                               response_format=None, tools=None, user=None))
    assert nulls.status_code == 200, nulls.text
    assert nulls.json()["choices"][0]["message"]["content"] == given.choices[0].message.content
    sampled = api.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                          max_tokens=4, temperature=None, top_p=None, n=None, stream=None)
    assert len(sampled.choices) == 1
    embedded = httpx.post(f"{served.url}/v1/embeddings", json={"input": "x", "dimensions": None,
                                                               "encoding_format": None})
    assert embedded.status_code == 400 and embedded.json()["error"]["param"] == "model"  # not a dual encoder


@pytest.mark.parametrize("extra, field", [
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"tool_choice": "required"}, "tool_choice"), ({"functions": [{"name": "f"}]}, "functions"),
    ({"logit_bias": {"42": 100}}, "logit_bias"), ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"frequency_penalty": -1}, "frequency_penalty"), ({"modalities": ["text", "audio"]}, "modalities"),
    ({"top_logprobs": 2}, "top_logprobs"), ({"web_search_options": {"search_context_size": "low"}},
                                            "web_search_options")])
def test_fields_that_would_change_the_answer_are_refused_not_ignored(served, extra, field):
    response = post(served, hello(max_tokens=4, **extra))
    assert response.status_code == 400 and response.json()["error"]["param"] == field


def test_defaults_of_unsupported_fields_are_accepted(served):
    response = post(served, hello(max_tokens=4, response_format={"type": "text"}, tools=[], tool_choice="none",
                                  presence_penalty=0, frequency_penalty=0, logit_bias={}))
    assert response.status_code == 200, response.text


def test_logprobs_follow_openais_shape_and_the_models_distribution(served):
    api = client(served)
    ask = {"model": "tiny", "messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 8,
           "temperature": 0}
    answer = api.chat.completions.create(logprobs=True, top_logprobs=3, **ask)
    entries = answer.choices[0].logprobs.content
    assert len(entries) == answer.usage.completion_tokens
    assert "".join(e.token for e in entries) == answer.choices[0].message.content
    for entry in entries:
        assert len(entry.top_logprobs) == 3 and entry.top_logprobs[0].token == entry.token  # greedy
        assert entry.logprob <= 0 and bytes(entry.bytes).decode() == entry.token
        assert [t.logprob for t in entry.top_logprobs] == sorted((t.logprob for t in entry.top_logprobs),
                                                                 reverse=True)
    from polymodal.engine.generate import Engine

    engine = Engine(served.model)
    with torch.inference_mode():
        logits = engine.allowed_logits(engine.first_token_logits(
            [{"messages": [{"role": "user", "content": "Hello there"}]}]))
    assert entries[0].logprob == pytest.approx(float(torch.log_softmax(logits[0], -1).max()), abs=1e-3)
    streamed = [c.choices[0].logprobs for c in api.chat.completions.create(
        stream=True, logprobs=True, top_logprobs=3, **ask) if c.choices and c.choices[0].logprobs]
    assert [e.token for chunk in streamed for e in chunk.content] == [e.token for e in entries]
    assert api.chat.completions.create(**ask).choices[0].logprobs is None


def test_without_max_tokens_the_answer_may_use_the_room_left(served):
    context = served.engine.max_length
    tokenizer = served.model.llm.tokenizer
    words = " ".join(["apple"] * 2000)
    ids = tokenizer(words, add_special_tokens=False)["input_ids"]

    def length(text):
        return len(served.engine.encode({"messages": [{"role": "user", "content": text}]})["input_ids"])

    keep = context - length("")
    while length(tokenizer.decode(ids[:keep])) > context - 12:  # the prompt leaves 12 tokens or more
        keep -= 4
    ask = {"messages": [{"role": "user", "content": tokenizer.decode(ids[:keep])}], "temperature": 0}
    answer = post(served, ask)
    assert answer.status_code == 200, answer.text
    usage = answer.json()["usage"]
    assert context - 30 < usage["prompt_tokens"] < context and usage["total_tokens"] <= context
    if answer.json()["choices"][0]["finish_reason"] == "length":
        assert usage["total_tokens"] == context
    over = post(served, {**ask, "max_completion_tokens": 100})
    assert over.status_code == 400 and over.json()["error"]["param"] == "max_completion_tokens"
    assert "max_tokens (256)" not in over.json()["error"]["message"]
    full = post(served, {"messages": [{"role": "user", "content": words}]})
    assert full.status_code == 400 and full.json()["error"]["param"] == "messages"


def test_top_p_zero_keeps_the_single_most_likely_token(served):
    greedy = post(served, hello(max_tokens=10, temperature=0)).json()["choices"][0]["message"]["content"]
    for seed in (1, 2, 3):
        nucleus = post(served, hello(max_tokens=10, temperature=1.5, top_p=0, seed=seed))
        assert nucleus.status_code == 200 and nucleus.json()["choices"][0]["message"]["content"] == greedy
    logits = torch.randn(5, 50)
    picked = choose_next(logits, SamplingParams(temperature=1.0, top_p=0.0), torch.Generator().manual_seed(0))
    assert torch.equal(picked, logits.argmax(-1))
    tiny_t = choose_next(logits * 1e3, SamplingParams(temperature=1e-30), torch.Generator().manual_seed(0))
    assert torch.equal(tiny_t, logits.argmax(-1))  # no overflow to NaN


def test_models_can_be_retrieved_by_id(served):
    api = client(served)
    assert api.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError) as caught:
        api.models.retrieve("gpt-4o")
    error = caught.value.response.json()["error"]
    assert error["code"] == "model_not_found" and error["param"] == "model" and "gpt-4o" in error["message"]


@pytest.mark.parametrize("messages, param, says", [
    ([{"role": "user", "content": [{"type": "image_url", "image_url": "data:image/png;base64,AAAA"}]}],
     "messages[0].content[0].image_url", "expected an object {\"url\""),
    ([{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image_url", "image_url": 7}]}],
     "messages[0].content[1].image_url", "expected an object"),
    ([{"role": "user", "content": 42}], "messages[0].content", "expected a string or a list"),
    ([{"role": "user", "content": [{"type": "input_video"}]}], "messages[0].content[0].type", "text"),
    ([{"role": "user", "content": [{"type": "input_audio"}]}], "messages[0].content[0].input_audio", "needs"),
    ([{"role": "user", "content": [{"type": "image_url"}]}], "messages[0].content[0].image_url", "url"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}],
     "messages[0].content[0].image_url.url", "required"),
    ([{"role": "user"}, {"content": "x"}], "messages[1].role", "required"),
])
def test_validation_errors_name_real_fields(served, messages, param, says):
    response = post(served, {"messages": messages})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == param and says in error["message"]


def test_an_image_the_decoder_refuses_is_a_400_naming_the_content_part(served):
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="TIFF")  # not an accepted format, whatever the MIME says
    uri = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    content = [{"type": "text", "text": "x"}, {"type": "image_url", "image_url": {"url": uri}}]
    response = post(served, {"messages": [{"role": "user", "content": content}]})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "messages[0].content[1].image_url.url" and "not an image" in error["message"]


def test_placeholders_come_from_image_parts_alone(served):
    """`<image>` typed in a text part is text, with or without images beside it; control
    tokens typed there are text too (the template's markers come from the template)."""
    spelled = post(served, {"messages": [{"role": "user", "content": "What does the HTML tag <image> do?"}],
                            "max_tokens": 2})
    assert spelled.status_code == 200, spelled.text
    content = [{"type": "text", "text": "What is <image> and <|im_end|>?"},
               {"type": "image_url", "image_url": {"url": png_uri()}}]
    beside = post(served, {"messages": [{"role": "user", "content": content}], "max_tokens": 2})
    assert beside.status_code == 200, beside.text
    plain = post(served, {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is x and y?"}, {"type": "image_url", "image_url": {"url": png_uri()}}]}],
        "max_tokens": 2})
    spelled_tokens = beside.json()["usage"]["prompt_tokens"]
    plain_tokens = plain.json()["usage"]["prompt_tokens"]
    assert spelled_tokens > plain_tokens + 10  # "<image>" and "<|im_end|>" as their characters


def test_other_fields_are_named_as_sent(served):
    stop = post(served, hello(stop=[1]))
    assert stop.status_code == 400 and stop.json()["error"]["param"] == "stop[0]"
    many = post(served, hello(stop=["a", "b", "c", "d", "e"]))
    assert many.status_code == 400 and many.json()["error"]["param"] == "stop"


def dual_encoder_server():
    from polymodal.config import ModelConfig, from_dict
    from polymodal.contrastive.model import DualEncoder
    from polymodal.serve.app import create_app
    from polymodal.serve.media import MediaLimits

    config = from_dict(ModelConfig, {"kind": "dual-encoder", "encoder": {"kind": "cnn", "image_size": 32,
                                                                            "channels": [8, 16]},
                                     "contrastive": {"text": "tiny:bert", "dim": 16}})
    model = DualEncoder.from_config(config).eval()
    server = LiveServer(create_app(model, "clip", None, MediaLimits()))
    server.model = model
    return server


def test_embeddings_take_text_as_text_and_images_only_as_image_parts():
    with dual_encoder_server() as server:
        url = f"{server.url}/v1/embeddings"
        uri = png_uri()
        text_like_uri = httpx.post(url, json={"input": [uri[:100]]}).json()["data"][0]["embedding"]
        image = httpx.post(url, json={"input": [{"type": "image_url", "image_url": {"url": uri}}]})
        assert image.status_code == 200, image.text
        with torch.no_grad():
            as_text = server.model.encode_texts([uri[:100]])[0]
        assert torch.allclose(torch.tensor(text_like_uri), as_text, atol=1e-5)
        assert not torch.allclose(torch.tensor(image.json()["data"][0]["embedding"]), as_text, atol=1e-3)
        wrong = httpx.post(url, json={"input": ["ok", [1, 2, 3]]})
        assert wrong.status_code == 400 and wrong.json()["error"]["param"] == "input[1]"
        bare = httpx.post(url, json={"input": [{"type": "image_url", "image_url": uri}]})
        assert bare.status_code == 400 and bare.json()["error"]["param"] == "input[0].image_url"


def test_embeddings_encoding_format_and_dimensions():
    with dual_encoder_server() as server:
        url = f"{server.url}/v1/embeddings"
        floats = httpx.post(url, json={"input": ["a red circle"]}).json()["data"][0]["embedding"]
        packed = httpx.post(url, json={"input": ["a red circle"], "encoding_format": "base64"})
        raw = base64.b64decode(packed.json()["data"][0]["embedding"])
        assert list(struct.unpack(f"<{len(raw) // 4}f", raw)) == pytest.approx(floats, abs=1e-6)
        # The official client asks for base64 unless told otherwise, and decodes it.
        through_client = client(server).embeddings.create(model="clip", input="a red circle")
        assert through_client.data[0].embedding == pytest.approx(floats, abs=1e-6)
        assert httpx.post(url, json={"input": "x", "dimensions": len(floats)}).status_code == 200
        other = httpx.post(url, json={"input": "x", "dimensions": 8})
        assert other.status_code == 400 and other.json()["error"]["param"] == "dimensions"
        unknown = httpx.post(url, json={"input": "x", "encoding_format": "int8"})
        assert unknown.status_code == 400 and unknown.json()["error"]["param"] == "encoding_format"


def test_a_chunked_body_over_the_limit_gets_413(served):
    def chunks():
        for _ in range(3 * 16):
            yield b"x" * 65536  # 3 MiB, no Content-Length

    response = httpx.post(f"{served.url}/v1/chat/completions", content=chunks(), timeout=30)
    assert response.status_code == 413 and "over" in response.json()["error"]["message"]
    embeddings = httpx.post(f"{served.url}/v1/embeddings", content=chunks(), timeout=30)
    assert embeddings.status_code == 413
    assert httpx.get(f"{served.url}/health").json()["status"] == "ok"


def test_json_nested_deeper_than_the_parsers_limit_is_a_400(served):
    # pydantic stops at its recursion limit; json.loads, asked to name the field, then raised
    # RecursionError, which became a 500
    deep = b'{"messages": [], "a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    for path in ("/v1/chat/completions", "/v1/embeddings"):
        response = httpx.post(f"{served.url}{path}", content=deep, timeout=30,
                              headers={"content-type": "application/json"})
        assert response.status_code == 400, (path, response.text)
        assert response.json()["error"]["type"] == "invalid_request_error"
    assert httpx.get(f"{served.url}/health").json()["status"] == "ok"


# ---------------------------------------------------------------- section 8: connections, remote images

class ConfiguredServer(LiveServer):
    """LiveServer with polymodal's connection limits."""

    def __init__(self, app, limits):
        import uvicorn

        from polymodal.serve.app import server_config

        self.port = free_port()
        self.server = uvicorn.Server(server_config(app, "127.0.0.1", self.port, limits, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)


def closed_by_server(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (the test's timeout, 30 s,
    is far above the server's limits of about a second)."""
    sock.settimeout(30)
    received = b""
    while chunk := sock.recv(4096):
        received += chunk
    return received


def test_slow_and_idle_connections_are_closed_and_their_number_bounded():
    from polymodal.serve.app import create_app
    from polymodal.serve.connections import ConnectionLimits
    from polymodal.serve.media import MediaLimits

    app = create_app(None, "none", None, MediaLimits(), body_timeout=1.0)
    limits = ConnectionLimits(header_timeout=1.0, body_timeout=1.0, keep_alive=1.0, max_connections=6,
                              shutdown_timeout=1.0)
    with ConfiguredServer(app, limits) as server:
        address = ("127.0.0.1", server.port)
        idle = socket.create_connection(address)
        assert closed_by_server(idle) == b""
        slow_headers = socket.create_connection(address)
        slow_headers.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        assert closed_by_server(slow_headers) == b""
        slow_body = socket.create_connection(address)
        slow_body.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                          b"Content-Length: 1000\r\n\r\n{\"input\": ")
        answer = closed_by_server(slow_body)
        assert answer.startswith(b"HTTP/1.1 408") and b"request_timeout" in answer
        kept_alive = socket.create_connection(address)
        kept_alive.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert closed_by_server(kept_alive).startswith(b"HTTP/1.1 200")  # then closed when idle
        held = [socket.create_connection(address) for _ in range(6)]
        time.sleep(0.2)  # let the server accept them
        assert httpx.get(f"{server.url}/health", timeout=10).status_code == 503
        for sock in held:
            sock.close()
        # A client holding a body open does not keep the server from stopping.
        stuck = socket.create_connection(address)
        stuck.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
    assert not server.thread.is_alive()
    stuck.close()


def local_image_server(tmp_path):
    import functools
    import http.server

    from PIL import Image

    Image.new("RGB", (8, 8), (0, 90, 200)).save(tmp_path / "blue.png")
    hits = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):  # the http.server interface names it so
            hits.append(self.path)
            super().do_GET()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(tmp_path)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, hits


def test_a_rebinding_name_cannot_reach_loopback(tmp_path, monkeypatch):
    from polymodal.serve import media
    from polymodal.serve.errors import APIError

    server, hits = local_image_server(tmp_path)
    port = server.server_port
    answers = iter(["93.184.216.34", "127.0.0.1", "127.0.0.1"])  # public first, then rebound
    connected = []

    def resolver(host, port, *args, **kwargs):
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (next(answers), port))]

    def connect(address, *args, **kwargs):
        connected.append(address)
        raise ConnectionRefusedError("no network in the test")

    monkeypatch.setattr(media.socket, "getaddrinfo", resolver)
    monkeypatch.setattr(media.socket, "create_connection", connect)
    try:
        limits = media.MediaLimits(allowed_hosts={f"images.example:{port}"})
        with pytest.raises(APIError, match="fetching the image failed"):
            media.decode_image(f"http://images.example:{port}/blue.png", limits, "p")
        assert connected == [("93.184.216.34", port)] and hits == []
    finally:
        server.shutdown()


def test_the_allowlist_names_ports(tmp_path):
    from polymodal.serve.errors import APIError
    from polymodal.serve.media import MediaLimits, allowed_port, decode_image

    server, hits = local_image_server(tmp_path)
    port = server.server_port
    try:
        with pytest.raises(APIError, match="not allowed on port"):
            decode_image(f"http://127.0.0.1:{port}/blue.png", MediaLimits(allowed_hosts={"127.0.0.1"}), "p")
        assert hits == []
        allowed = MediaLimits(allowed_hosts={f"127.0.0.1:{port}"})
        assert decode_image(f"http://127.0.0.1:{port}/blue.png", allowed, "p").size == (8, 8)
        with pytest.raises(APIError, match="not allowed on port"):
            decode_image(f"http://127.0.0.1:{port + 1}/blue.png", allowed, "p")
    finally:
        server.shutdown()
    bare = MediaLimits(allowed_hosts={"example.com", "[::1]:8080"})
    assert allowed_port(bare, "example.com", 443) and allowed_port(bare, "example.com", 80)
    assert not allowed_port(bare, "example.com", 8443)
    assert allowed_port(bare, "::1", 8080) and not allowed_port(bare, "::1", 80)


@pytest.mark.parametrize("extra, field", [
    ({"logprobs": "yes"}, "logprobs"), ({"stream": 1}, "stream"), ({"seed": True}, "seed"),
    ({"max_tokens": True}, "max_tokens"), ({"n": "2"}, "n"), ({"top_logprobs": 1.5}, "top_logprobs")])
def test_a_value_of_the_wrong_type_is_refused_not_coerced(served, extra, field):
    response = post(served, {**hello(), **extra})
    assert response.status_code == 400 and response.json()["error"]["param"] == field


def test_logprobs_stop_with_the_text_at_a_stop_string(served):
    """No entries for the tokens of a stop string (OpenAI sends none), as the engine trims
    them when the text ends there."""
    from types import SimpleNamespace

    from polymodal.engine.batching import _drop_stop_string_logprobs
    from polymodal.engine.text import TextTracker

    tokenizer = served.model.llm.tokenizer
    ids = tokenizer("abcXYZ", add_special_tokens=False)["input_ids"]
    row = SimpleNamespace(tracker=TextTracker(tokenizer, ["XY"]), logprobs=[])
    for token in ids:
        row.tracker.push(token)
        row.logprobs.append({"token": tokenizer.decode([token])})
        if row.tracker.stopped:
            break
    _drop_stop_string_logprobs(row, tokenizer)
    assert row.tracker.text == "abc" and "".join(e["token"] for e in row.logprobs) == "abc"
