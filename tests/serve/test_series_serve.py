"""Series as `input_series` content parts ({"data": [T] or [T][C] numbers, time first}):
answered through the official openai client by a live server as the model answers alone;
one longer than the encoder's length is answered as its last `length` steps; over the
server's limits, too wide, ragged, non-finite or too many series get a 400 naming the
part, and the server keeps serving."""

import math

import httpx
import numpy as np
import pytest
import torch

from conftest import tiny_series_model
from polymodal.engine.generate import Engine
from polymodal.engine.sampling import SamplingParams
from polymodal.serve.errors import APIError
from polymodal.serve.media import MediaLimits, decode_series

openai = pytest.importorskip("openai")

CHANNELS, LENGTH = 3, 32


def wave(steps: int, channels: int = CHANNELS, hertz: float = 1.0) -> list:
    """[steps][channels] of sines, as a client would send them."""
    time = np.arange(steps) / 10
    return [[round(math.sin(hertz * t + c), 4) for c in range(channels)] for t in time]


def series_message(data, text: str = "What activity is this?") -> list[dict]:
    return [{"role": "user", "content": [{"type": "input_series", "input_series": {"data": data}},
                                         {"type": "text", "text": text}]}]


@pytest.mark.parametrize("data, says", [
    ([], "empty"),
    ([1.0] * 9, "over this server's limit of 8"),
    ([[1.0] * 5] * 2, "series of 5 channels is over this server's limit of 4"),
    ([[1.0, 2.0], [3.0]], "step 1 has 1 values, step 0 has 2"),
    ([[1.0], 2.0], "step 1 is a number but step 0 is a row of 1 values"),
    ([1.0, [2.0]], "step 1 is a list but step 0 is a number"),
    ([[]], "step 0 is an empty row"),
    ([1.0, None], "step 1 of channel 0 is null"),
    ([[1.0, "nan"]], "step 0 of channel 1 is a string"),
    ([1.0, float("nan")], "is NaN"),
    ([float("inf")], "is infinite"),
    ([10 ** 400], "is infinite (or beyond float64)"),
    ([True, 1.0], "is a boolean"),
    ([[[1.0]]], "step 0 of channel 0 is a list"),
])
def test_decode_series_refuses_with_the_part_named(data, says):
    limits = MediaLimits(max_series_steps=8, max_series_channels=4)
    with pytest.raises(APIError) as refused:
        decode_series(data, limits, "messages[0].content[0].input_series.data")
    assert refused.value.status == 400 and says in refused.value.message
    assert refused.value.param == "messages[0].content[0].input_series.data"


def test_decode_series_reads_one_channel_or_rows_time_first():
    assert decode_series([1, 2.5, 3], MediaLimits(), "p").shape == (3, 1)
    values = decode_series([[1, 2], [3, 4], [5, 6]], MediaLimits(), "p")
    assert values.shape == (3, 2) and values[:, 1].tolist() == [2, 4, 6]  # [T, C]


def alone(data, text: str = "What activity is this?") -> dict:
    """The prompt the model is given alone: the series as the array the request held, its
    placeholder where the part was (a part is followed by the text part, no newline)."""
    return {"messages": [{"role": "user", "content": "<series>" + text}], "images": [],
            "media": {"series": [np.asarray(data, dtype=np.float64)]}}


def expected(model, data, max_tokens: int = 6) -> str:
    """What the model answers alone, through the one generation path."""
    return Engine(model).generate([alone(data)], SamplingParams(max_new_tokens=max_tokens))[0].text


def first_logprobs(model, data) -> torch.Tensor:
    """[V]: the log-probabilities of the first answer token, as the server reports them."""
    engine = Engine(model)
    with torch.inference_mode():
        return torch.log_softmax(engine.allowed_logits(engine.first_token_logits([alone(data)])), -1)[0]


@pytest.fixture(scope="module")
def served():
    from test_serve import LiveServer

    from polymodal.engine.batching import BatchingEngine
    from polymodal.serve.app import create_app

    model = tiny_series_model(CHANNELS, LENGTH)
    with torch.no_grad():  # a sharper random model: greedy choices are not near-ties
        model.llm.model.get_output_embeddings().weight.mul_(8)
    engine = BatchingEngine(model, max_batch=2, max_queue=8).start()
    app = create_app(model, "tiny", engine, MediaLimits(max_series_steps=100, max_series_channels=5, max_series=2))
    try:
        with LiveServer(app) as server:
            server.model = model
            yield server
    finally:
        engine.stop()


def test_a_series_is_answered_as_the_model_answers_it_alone(served):
    api = openai.OpenAI(base_url=f"{served.url}/v1", api_key="unused", max_retries=0)
    seen = []
    for data in (wave(20), wave(LENGTH, channels=2, hertz=3.0), [0.5 * t for t in range(12)]):  # short, fewer channels, [T]
        answer = api.chat.completions.create(model="tiny", messages=series_message(data), max_tokens=6,
                                             temperature=0, logprobs=True, top_logprobs=5)
        assert answer.choices[0].message.content == expected(served.model, data)
        served_top = [entry.logprob for entry in answer.choices[0].logprobs.content[0].top_logprobs]
        torch.testing.assert_close(torch.tensor(served_top), first_logprobs(served.model, data).topk(5).values,
                                   atol=1e-4, rtol=1e-4)
        seen.append(served_top)
    assert seen[0] != seen[1] != seen[2]  # each series reaches the model (greedy text alone may not show it)


def test_a_series_longer_than_the_encoder_is_answered_as_its_last_length_steps(served):
    api = openai.OpenAI(base_url=f"{served.url}/v1", api_key="unused", max_retries=0)
    data = wave(LENGTH + 9, hertz=2.0)  # under the server's limit of 100 steps, over the encoder's 32
    answer = api.chat.completions.create(model="tiny", messages=series_message(data), max_tokens=6,
                                         temperature=0, logprobs=True, top_logprobs=5)
    assert answer.choices[0].message.content == expected(served.model, data[-LENGTH:])
    served_top = [entry.logprob for entry in answer.choices[0].logprobs.content[0].top_logprobs]
    torch.testing.assert_close(torch.tensor(served_top), first_logprobs(served.model, data[-LENGTH:]).topk(5).values,
                               atol=1e-4, rtol=1e-4)
    assert not torch.allclose(first_logprobs(served.model, data[:LENGTH]), first_logprobs(served.model, data[-LENGTH:]))


REFUSALS = [  # (content, status, param, says): the series part is content[0]
    (series_message(wave(101)), "messages[0].content[0].input_series.data", "over this server's limit of 100"),
    (series_message(wave(10, channels=4)), "messages[0].content[0].input_series.data",
     f"series of 4 channels has more than the encoder's {CHANNELS}"),
    (series_message(wave(10, channels=6)), "messages[0].content[0].input_series.data",
     "series of 6 channels is over this server's limit of 5"),
    (series_message([[1.0, 2.0], [3.0]]), "messages[0].content[0].input_series.data", "step 1 has 1 values"),
    (series_message([1.0, "NaN"]), "messages[0].content[0].input_series.data", "step 1 of channel 0 is a string"),
    ([{"role": "user", "content": [{"type": "input_series", "input_series": {"data": [1.0]}}] * 3}],
     "messages[0].content[2]", "too many series: at most 2"),
    ([{"role": "user", "content": [{"type": "input_series"}]}], "messages[0].content[0].input_series",
     'needs "input_series"'),
    ([{"role": "user", "content": [{"type": "input_series", "input_series": [1.0, 2.0]}]}],
     "messages[0].content[0].input_series", 'expected an object {"data": [[...], ...]}'),
]


def test_bad_series_get_a_400_naming_the_part_and_the_server_keeps_serving(served):
    api = openai.OpenAI(base_url=f"{served.url}/v1", api_key="unused", max_retries=0)
    for messages, param, says in REFUSALS:
        with pytest.raises(openai.BadRequestError) as refused:
            api.chat.completions.create(model="tiny", messages=messages, max_tokens=4)
        error = refused.value.body
        assert refused.value.status_code == 400 and says in error["message"], error
        assert error["param"] == param, error
    # JSON's NaN literal, which Python's JSON reader (and so the server's) accepts
    body = ('{"model": "tiny", "max_tokens": 4, "messages": [{"role": "user", "content": [{"type": "input_series", '
            '"input_series": {"data": [1.0, NaN, 2.0]}}]}]}')
    refused = httpx.post(f"{served.url}/v1/chat/completions", content=body, timeout=30,
                         headers={"content-type": "application/json"})
    assert refused.status_code == 400, refused.text
    assert "step 1 of channel 0 is NaN" in refused.json()["error"]["message"], refused.text
    answer = api.chat.completions.create(model="tiny", messages=series_message(wave(16)), max_tokens=4, temperature=0)
    assert answer.choices[0].message.content == expected(served.model, wave(16), max_tokens=4)


def test_a_model_without_a_series_encoder_refuses_input_series(tiny_llava):
    from polymodal.serve.chat import to_prompt
    from polymodal.serve.schemas import ChatRequest

    body = ChatRequest.model_validate({"model": "tiny", "messages": series_message([1.0, 2.0])})
    with pytest.raises(APIError, match="this model takes no series"):
        to_prompt(body, tiny_llava, MediaLimits())
