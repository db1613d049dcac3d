"""The request bodies of OpenAI's chat completions and embeddings APIs (the parts we serve).

Following OpenAI's API reference (https://platform.openai.com/docs/api-reference): a field
sent as `null` means "not given" (its default), as the official clients send it; fields we
do not implement and that would change the answer are refused by `unsupported()` rather
than silently ignored, so a client never believes it got JSON, a tool call or penalties."""

from __future__ import annotations

from typing import Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    field_validator,
    model_validator,
)

SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed takes


class OpenAIBody(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields we do not use (user, ...)

    @model_validator(mode="before")
    @classmethod
    def _null_is_not_given(cls, data):
        if isinstance(data, dict):
            return {key: value for key, value in data.items() if value is not None}
        return data


class ImageURL(BaseModel):
    url: str
    detail: str | None = None


class InputAudio(BaseModel):
    data: str  # the clip's bytes in base64
    format: str  # "wav" (OpenAI also names "mp3", refused here: 415)


class InputSeries(BaseModel):
    # [T] or [T][C] numbers, time first as in a CSV; checked by serve.media.decode_series
    # (not here, so that each refusal names the part and the step).
    data: list


# What each media part's object looks like, for the error that refuses another type.
MEDIA_PART_SHAPES = {"image_url": '{"url": "data:image/png;base64,..."}',
                     "input_audio": '{"data": BASE64, "format": "wav"}',
                     "input_series": '{"data": [[...], ...]}'}


class ContentPart(BaseModel):
    type: Literal["text", "image_url", "input_audio", "input_series"]
    text: str | None = None
    image_url: ImageURL | None = None
    input_audio: InputAudio | None = None
    input_series: InputSeries | None = None

    @field_validator("image_url", "input_audio", "input_series", mode="before")
    @classmethod
    def _an_object(cls, value, info):
        if value is not None and not isinstance(value, dict):
            raise ValueError(f"expected an object {MEDIA_PART_SHAPES[info.field_name]}, got {_kind(value)}")
        return value


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "developer"]
    content: list[ContentPart] | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_or_parts(cls, value):
        if isinstance(value, str):  # a plain string is one text part
            return [{"type": "text", "text": value}]
        if value is not None and not isinstance(value, list):
            raise ValueError(f"expected a string or a list of content parts, got {_kind(value)}")
        return value


class ChatRequest(OpenAIBody):
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    # Strict: "yes" or true is not a number of tokens, a seed or a switch (pydantic would coerce).
    max_tokens: StrictInt | None = Field(default=None, ge=1)
    max_completion_tokens: StrictInt | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2, allow_inf_nan=False)
    top_p: float = Field(default=1.0, ge=0, le=1, allow_inf_nan=False)
    stop: list[str] | None = Field(default=None, max_length=4)  # OpenAI: up to 4
    seed: StrictInt | None = Field(default=None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    n: StrictInt = Field(default=1, ge=1, le=8)
    stream: StrictBool = False
    stream_options: dict | None = None
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = Field(default=None, ge=0, le=20)
    # Accepted only with the values that mean "not used" (see unsupported()).
    response_format: dict | None = None
    tools: list | None = None
    tool_choice: str | dict | None = None
    functions: list | None = None
    function_call: str | dict | None = None
    logit_bias: dict | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    audio: dict | None = None
    modalities: list[str] | None = None
    prediction: dict | None = None
    web_search_options: dict | None = None

    @field_validator("stop", mode="before")
    @classmethod
    def _one_or_more(cls, value):
        return [value] if isinstance(value, str) else value

    @field_validator("stop")
    @classmethod
    def _short(cls, value):
        if value and any(len(s) > 256 for s in value):
            raise ValueError("a stop string is at most 256 characters")
        return value

    def max_tokens_field(self) -> str | None:
        """The name the client used for the answer's length limit, if it sent one."""
        if self.max_completion_tokens is not None:
            return "max_completion_tokens"
        return "max_tokens" if self.max_tokens is not None else None

    def unsupported(self) -> tuple[str, str] | None:
        """(field, message) for the first field set to something this server does not do."""
        if self.response_format and self.response_format.get("type", "text") != "text":
            return "response_format", "only response_format {\"type\": \"text\"} is supported"
        for name in ("tools", "functions", "logit_bias", "audio", "prediction", "web_search_options"):
            if getattr(self, name):
                return name, f"{name} is not supported by this server"
        for name in ("tool_choice", "function_call"):
            if getattr(self, name) not in (None, "none"):
                return name, f"{name} is not supported by this server (no tools)"
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) != 0:
                return name, f"{name} is not supported by this server; send 0 or leave it out"
        if self.modalities and self.modalities != ["text"]:
            return "modalities", "this server answers in text only"
        if self.top_logprobs and not self.logprobs:
            return "top_logprobs", "top_logprobs needs logprobs: true"
        return None


class EmbeddingInput(ContentPart):
    """One input: a string is text; an image is a content part, as in chat messages:
    {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}."""

    @model_validator(mode="before")
    @classmethod
    def _text_or_part(cls, value):
        if isinstance(value, str):
            return {"type": "text", "text": value}
        if not isinstance(value, dict):
            raise ValueError('expected a string or an object {"type": "image_url", "image_url": '
                             f'{{"url": ...}}}}, got {_kind(value)}')
        return value


class EmbeddingRequest(OpenAIBody):
    model: str | None = None
    input: list[EmbeddingInput] = Field(min_length=1, max_length=2048)  # OpenAI: up to 2048
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)

    @field_validator("input", mode="before")
    @classmethod
    def _one_or_more(cls, value):
        return [value] if isinstance(value, (str, dict)) else value


class ImageGenerationRequest(OpenAIBody):
    """OpenAI's image generation body (https://platform.openai.com/docs/api-reference/images/create)
    and four extensions of ours: `guidance_scale` (classifier-free guidance, 1: none), `seed`
    (image j uses seed + j), `temperature` and `top_k` of the code sampling."""

    prompt: str = Field(min_length=1, max_length=32000)  # OpenAI: up to 32000 characters
    model: str | None = None
    n: StrictInt = Field(default=1, ge=1, le=10)  # OpenAI: 1 to 10
    size: str | None = None  # only the model's own "SxS" (or "auto"): checked against the model
    response_format: str | None = None  # only "b64_json"
    output_format: str | None = None  # only "png"
    quality: str | None = None  # "auto" or "standard": one quality here
    style: str | None = None  # refused: no styles
    background: str | None = None  # "auto" or "opaque": drawings have no alpha channel
    stream: StrictBool | None = None  # refused when true: no partial images are streamed
    partial_images: StrictInt | None = None  # refused above 0, as stream
    guidance_scale: float = Field(default=1.0, ge=0, le=100, allow_inf_nan=False)
    seed: StrictInt | None = Field(default=None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    temperature: float = Field(default=1.0, ge=0, le=2, allow_inf_nan=False)
    top_k: StrictInt = Field(default=0, ge=0)

    def unsupported(self) -> tuple[str, str] | None:
        """(field, message) for the first field set to something this server does not do."""
        if self.response_format not in (None, "b64_json"):
            return "response_format", ('only response_format "b64_json" is supported (the image comes '
                                       'back in the response; this server keeps no files to link to)')
        if self.output_format not in (None, "png"):
            return "output_format", 'only output_format "png" is supported'
        if self.quality not in (None, "auto", "standard"):
            return "quality", 'quality is not supported by this server; send "auto" or leave it out'
        if self.style is not None:
            return "style", "style is not supported by this server"
        if self.background not in (None, "auto", "opaque"):
            return "background", 'only background "opaque" or "auto" is supported (drawings have no alpha channel)'
        if self.stream:
            return "stream", "streamed image generation is not supported; send stream: false"
        if self.partial_images:
            return "partial_images", "partial images are not supported (no streaming); send 0"
        return None


def _kind(value) -> str:
    names = {str: "a string", int: "a number", float: "a number", bool: "a boolean", list: "a list",
             dict: "an object"}
    return names.get(type(value), type(value).__name__)
