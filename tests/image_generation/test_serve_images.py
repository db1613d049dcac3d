"""Drawing on the server (issue 17 §2, §4): drawing requests batched with chats in the same
steps, draw what Engine.generate_images draws; `POST /v1/images/generations` through the
official openai client; chat answers that draw carry their images (plain, streamed, and on
the chat page in a real browser)."""

import base64
import io
import shutil

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from test_serve import client, live_server
from torch import nn

from polymodal.engine.generate import Engine
from polymodal.engine.sampling import SamplingParams

openai = pytest.importorskip("openai")

# K = 16 codes of C = 16 per 16x16 image: the tiny drawing model of the core's tests.
DRAWING = {"llm": {"source": "tiny:llama"},
           "image_output": {"tokenizer": {"image_size": 16, "downsample": 4, "levels": [4, 4],
                                          "channels": [8, 8]}}}
SIZE = 16


def drawing_model(begins: bool = False):
    """The tiny drawing model with varied code logits (fresh, its code rows are zero) and a
    sharp text head (greedy choices are not near ties); with `begins`, a bias on
    `<begin_of_image>` makes its chat answers draw first, then write text."""
    from polymodal.config import ModelConfig, from_dict
    from polymodal.model import MultimodalLM

    torch.manual_seed(0)
    model = MultimodalLM(from_dict(ModelConfig, DRAWING)).eval()
    head = model.llm.model.get_output_embeddings()
    with torch.no_grad():
        head.weight.mul_(8)
        head.codes.weight.normal_(0.0, 1.0)
        if begins:
            head.codes.bias = nn.Parameter(torch.zeros(head.codes.out_features))
            head.codes.bias[0] = 1000.0  # <begin_of_image> whenever `constrain` allows it
    return model


def chat(text: str) -> dict:
    return {"messages": [{"role": "user", "content": [{"type": "text", "text": text}]}]}


def decoded(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def as_pixels(image: Image.Image) -> torch.Tensor:
    """An 8-bit RGB image -> [3, S, S] in [0, 1]."""
    return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).float() / 255


def events_of(request) -> list:
    return list(request.events(timeout=60))


def test_the_server_draws_what_the_engine_draws_batched_with_chats_that_draw():
    """Guided and unguided drawings (two slots and one per image) among chat requests whose
    answers draw, in a batch of 4 rows: each answer equals its own through Engine alone."""
    from polymodal.engine.batching import BatchingEngine

    model = drawing_model(begins=True)
    engine = BatchingEngine(model, max_batch=4, max_queue=16)  # not started: queue everything first
    prompt = chat("Draw a red circle.")
    guided = SamplingParams(temperature=1.0, seed=7, guidance_scale=3.0, top_k=8)
    plain = SamplingParams(temperature=1.0, seed=3)
    chats = [(chat("Hello there"), SamplingParams(max_new_tokens=35)),
             (chat("Draw and say"), SamplingParams(max_new_tokens=34, temperature=1.0, seed=11))]
    first = engine.submit(*chats[0])
    drawings = engine.submit_images(prompt, guided, n=2)
    second = engine.submit(*chats[1])
    unguided = engine.submit_images(chat("Draw a blue square."), plain, n=2)
    engine.start()
    try:
        done = {id(request): events_of(request) for request in [first, *drawings, second, *unguided]}
    finally:
        engine.stop()
    alone = Engine(model)
    for requests, want in ((drawings, alone.generate_images([prompt], guided, n=2)),
                           (unguided, alone.generate_images([chat("Draw a blue square.")], plain, n=2))):
        for request, pixels in zip(requests, want):
            kind, finished = done[id(request)][-1]
            assert kind == "done" and finished.finish_reason == "stop" and finished.completion_tokens == 16
            assert torch.allclose(finished.images[0], pixels, atol=1e-5)
    assert not torch.equal(done[id(drawings[0])][-1][1].images[0], done[id(drawings[1])][-1][1].images[0])
    for request, (text_prompt, params) in zip([first, second], chats):
        [want] = alone.generate([text_prompt], params)
        events = done[id(request)]
        finished = events[-1][1]
        assert len(want.images) == 1 and finished.text == want.text and finished.text
        assert len(finished.images) == 1 and torch.allclose(finished.images[0], want.images[0], atol=1e-5)
        assert [kind for kind, _ in events if kind == "image"] == ["image"]
        assert "".join(value for kind, value in events if kind == "text") == want.text


def test_a_model_that_does_not_draw_a_flow_model_and_a_guided_drawing_on_one_slot_are_refused():
    from conftest import tiny_model
    from polymodal.config import ModelConfig, from_dict
    from polymodal.engine.batching import BatchingEngine
    from polymodal.errors import UserError
    from polymodal.model import MultimodalLM

    with pytest.raises(UserError, match="does not draw images"):
        BatchingEngine(tiny_model()).submit_images(chat("Draw"), SamplingParams())
    flow = MultimodalLM(from_dict(ModelConfig, {"llm": {"source": "tiny:llama"}, "image_output": {
        "kind": "flow", "tokenizer": {"kind": "continuous", "image_size": 16, "downsample": 4,
                                      "channels": [8, 8], "latent_dim": 4}}})).eval()
    with pytest.raises(UserError, match="kind flow: draw with `polymodal generate`"):
        BatchingEngine(flow).submit_images(chat("Draw"), SamplingParams())
    with pytest.raises(UserError, match="guidance runs two rows"):
        BatchingEngine(drawing_model(), max_batch=1).submit_images(chat("Draw"), SamplingParams(guidance_scale=2.0))


def live(model, max_batch: int = 4, max_queue: int = 16):
    """A live server of `model` as "tiny-draw" (default media limits)."""
    return live_server(model, "tiny-draw", max_batch=max_batch, max_queue=max_queue)


@pytest.fixture(scope="module")
def served():
    with live(drawing_model(begins=True)) as server:
        yield server


def test_the_images_endpoint_through_the_openai_client(served):
    api = client(served)
    result = api.images.generate(model="tiny-draw", prompt="Draw a red circle.", n=2, size="16x16",
                                 response_format="b64_json", extra_body={"seed": 5, "guidance_scale": 2.0})
    images = [decoded(item.b64_json) for item in result.data]
    assert [(image.format, image.size) for image in images] == [("PNG", (SIZE, SIZE))] * 2
    want = Engine(served.model).generate_images([chat("Draw a red circle.")],
                                                SamplingParams(temperature=1.0, seed=5, guidance_scale=2.0), n=2)
    for image, pixels in zip(images, want):  # the PNG's 8 bits: within half a step of 1/255
        assert (as_pixels(image) - pixels).abs().max() <= 0.5 / 255 + 1e-6
    again = api.images.generate(prompt="Draw a red circle.", n=1, extra_body={"seed": 5, "guidance_scale": 2.0})
    assert again.data[0].b64_json == result.data[0].b64_json and result.created > 0
    assert api.models.list().data[0].model_extra["image_output"] == {"size": "16x16", "tokens": 18}


@pytest.mark.parametrize("body, status, param, says", [
    ({"size": "64x64"}, 400, "size", 'this model draws 16x16 images only; send size "16x16"'),
    ({"response_format": "url"}, 400, "response_format", 'only response_format "b64_json"'),
    ({"n": 11}, 400, "n", "less than or equal to 10"),
    ({"guidance_scale": -1}, 400, "guidance_scale", "greater than or equal to 0"),
    ({"style": "vivid"}, 400, "style", "not supported"),
    ({"background": "transparent"}, 400, "background", 'only background "opaque"'),
    ({"stream": True}, 400, "stream", "streamed image generation is not supported"),
    ({"partial_images": 2}, 400, "partial_images", "not supported"),
    ({"prompt": "word " * 600}, 400, "prompt", "the context of 512 tokens"),
])
def test_bad_image_requests_get_openai_errors(served, body, status, param, says):
    response = httpx.post(f"{served.url}/v1/images/generations", json={"prompt": "Draw a circle.", **body},
                          timeout=30)
    assert response.status_code == status
    error = response.json()["error"]
    assert error["param"] == param and says in error["message"], error
    assert httpx.get(f"{served.url}/health").json()["status"] == "ok"


def test_a_full_queue_is_429_and_a_model_that_does_not_draw_is_400(served, monkeypatch):
    from conftest import tiny_model
    from polymodal.engine.batching import QueueFull

    def full(*args, **kwargs):
        raise QueueFull("busy")

    monkeypatch.setattr(served.engine, "submit_images", full)
    busy = httpx.post(f"{served.url}/v1/images/generations", json={"prompt": "Draw"}, timeout=30)
    assert busy.status_code == 429 and busy.headers["retry-after"] == "1"
    assert busy.json()["error"]["code"] == "queue_full"
    with live(tiny_model(), max_batch=2) as plain, \
            pytest.raises(openai.BadRequestError, match="does not draw images") as refused:
        client(plain).images.generate(prompt="Draw a red circle.")
    assert len(refused.value.body["message"].splitlines()) == 1


def test_chat_answers_carry_the_images_they_draw(served):
    api = client(served)
    messages = [{"role": "user", "content": "Hello there"}]
    answer = api.chat.completions.create(model="tiny-draw", messages=messages, max_tokens=24, temperature=0)
    [want] = Engine(served.model).generate([chat("Hello there")], SamplingParams(max_new_tokens=24))
    message = answer.choices[0].message
    assert message.content == want.text
    [part] = message.model_extra["images"]
    assert part["type"] == "image_url" and part["image_url"]["url"].startswith("data:image/png;base64,")
    image = decoded(part["image_url"]["url"].split(",", 1)[1])
    assert image.size == (SIZE, SIZE) and (as_pixels(image) - want.images[0]).abs().max() <= 0.5 / 255 + 1e-6
    chunks = [c for c in api.chat.completions.create(model="tiny-draw", messages=messages, max_tokens=24,
                                                     temperature=0, stream=True) if c.choices]
    streamed = [c.choices[0].delta.model_extra.get("images") for c in chunks]
    assert [images[0]["image_url"]["url"] for images in streamed if images] == [part["image_url"]["url"]]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want.text


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed")
def test_the_chat_page_shows_a_drawn_image(served):
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=shutil.which("chromium"),
                                             args=["--no-sandbox", "--headless=new"])
        page = browser.new_page()
        page.goto(served.url + "/")
        page.fill("#question", "Draw a red circle.")
        page.click("#send")
        page.wait_for_selector("[data-done=true]", timeout=30000)
        size = page.eval_on_selector(".assistant img.drawn", "img => [img.naturalWidth, img.naturalHeight]")
        browser.close()
    assert size == [SIZE, SIZE]
