"""OpenAI API request models and the error type every endpoint answers with.

Models are strict (``"5"`` is not an integer, ``1`` is not a boolean): a
client that sends the wrong type learns which field is wrong instead of
getting a silently coerced value. A null for a field OpenAI declares nullable
(temperature, top_p, n, stream, echo, chat logprobs; vLLM's top_k too) asks
for its default, as leaving the field out does: clients that serialise every
field send it. Unknown fields are ignored so that clients
sending newer OpenAI parameters still work; known parameters whose non-default
values we cannot honour (penalties, echo, tools, functions, ...) are refused
with a 400 naming the field rather than silently ignored.
"""
from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from orca_serve.entrypoints.chat_messages import OPENAI_ROLES, MessageError, conversation
from orca_serve.shown import shown

MAX_N = 16  # choices per request; each one is a full engine request
# OpenAI's limit: every sequence's biases are added to its logits each
# iteration, and a request fans out to up to --max-waiting-requests sequences.
MAX_LOGIT_BIAS_TOKENS = 300
MAX_LOGPROBS = 20


class ApiError(Exception):
    """An error answered as OpenAI's {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 type: str = "invalid_request_error", code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.type, self.code, self.headers = type, code, headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type,
                          "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def name_field(param: str | None, message: str) -> str:
    """``"top_p: must be > 0"``: the message led by the field it is about,
    unless it already starts with that field (``"echo is not supported"``).
    A message about one item of a field that names the field bare (the engine
    checks one prompt at a time: ``"prompt: token id 9 ..."`` of ``prompt[1]``)
    is led by the item instead."""
    if not param or re.match(rf"{re.escape(param)}(?!\w)", message):
        return message
    field = re.split(r"[\[.]", param, maxsplit=1)[0]
    if field != param and re.match(rf"{re.escape(field)}(?![\w\[.])", message):
        return param + message[len(field):]
    return f"{param}: {message}"


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)


class StreamOptions(_Strict):
    include_usage: bool = False


class _SamplingFields(_Strict):
    """Parameters shared by /v1/completions and /v1/chat/completions."""

    model: str | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)  # OpenAI's default is 1.0, not greedy
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(-1, ge=-1)
    seed: int | None = None
    stop: str | list[str] | None = None
    # Not capped but by the body's size (OpenAI has no such field; vLLM sets no
    # cap): each list is checked and made a set and tensors once per request,
    # not per token, and what the sampler masks is at most the vocabulary.
    stop_token_ids: list[int] | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0)
    # Scheduling: lower priority value is more urgent; SLOs in milliseconds.
    priority: int = 0
    ttft_slo_ms: float | None = Field(None, gt=0)
    tpot_slo_ms: float | None = Field(None, gt=0)
    user: str | None = None
    # Token id (JSON keys are strings: "50256") -> bias in [-100, 100] (SamplingParams checks the range).
    logit_bias: dict[str, float] | None = None
    # Accepted only at their neutral values (see module docstring).
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    best_of: int | None = None

    # check_fields=False: echo is a field of completions only, logprobs of both
    # (completions' is already int | None, so its default is None as well).
    @field_validator("temperature", "top_p", "top_k", "n", "stream", "echo", "logprobs", mode="before",
                     check_fields=False)
    @classmethod
    def _null_is_default(cls, v, info):
        return cls.model_fields[info.field_name].default if v is None else v

    @field_validator("stop")
    @classmethod
    def _stop_non_empty(cls, v):
        # As a list: one list then serves every sequence of the request.
        v = [v] if isinstance(v, str) else v
        if v and "" in v:
            raise ValueError("stop strings must be non-empty")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _token_id_keys(cls, v):
        if v is None:
            return v
        if len(v) > MAX_LOGIT_BIAS_TOKENS:
            raise _field_error("logit_bias", f"logit_bias may bias at most {MAX_LOGIT_BIAS_TOKENS} tokens "
                                             f"(OpenAI's limit), got {len(v)}")
        out = {}
        for key, bias in v.items():
            # ASCII digits only: int() also reads " 5", "+5", "5_0" and other scripts' digits.
            if not (key.isascii() and key.isdigit()):
                raise _field_error("logit_bias", f"logit_bias: keys must be token ids (\"50256\"), got {shown(key)}")
            try:
                token = int(key)
            except ValueError:  # past Python's limit on digits read (4300): in no vocabulary
                raise _field_error("logit_bias", f"logit_bias: a token id of {len(key)} digits is outside the "
                                                 "vocabulary") from None
            if bias:  # a zero changes nothing; without zeros every sequence shares this map as it is
                out[token] = bias
        return out

    @model_validator(mode="after")
    def _neutral_only(self):
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) not in (None, 0, 0.0):
                raise _field_error(name, f"{name} is not supported (only 0)")
        if self.best_of not in (None, self.n):
            raise _field_error("best_of", "best_of must equal n (beam search is not supported)")
        if self.stream_options is not None and not self.stream:
            raise _field_error("stream_options", "stream_options is only allowed when stream is true")
        return self

    @property
    def include_usage_in_stream(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_SamplingFields):
    # str, list[str], list[int] (one tokenized prompt) or list[list[int]].
    prompt: Any
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's legacy default
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    suffix: str | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_shape(cls, v):
        def is_ids(x):
            return isinstance(x, list) and bool(x) and all(type(t) is int for t in x)
        if isinstance(v, str):
            return v
        if is_ids(v):
            return v
        if isinstance(v, list) and v and all(isinstance(p, str) or is_ids(p) for p in v):
            return v
        raise ValueError("prompt must be a non-empty string, a list of strings, "
                         "a list of token ids, or a list of token-id lists")

    @model_validator(mode="after")
    def _unsupported(self):
        if self.echo:
            raise _field_error("echo", "echo is not supported")
        if self.suffix:
            raise _field_error("suffix", "suffix is not supported")
        return self

    def prompts(self) -> list[str | list[int]]:
        """The prompts as a list, whichever of the four shapes was sent."""
        p = self.prompt
        if isinstance(p, str) or (p and type(p[0]) is int):
            return [p]
        return list(p)


class ChatCompletionRequest(_SamplingFields):
    # As chat templates take them: role, content as text, name if given (chat_messages.py).
    messages: list[dict]
    max_tokens: int | None = Field(None, ge=1)  # deprecated alias of max_completion_tokens
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list | None = None
    tool_choice: Any = None
    # tools' deprecated forerunners: still in OpenAI's API, and as unsupported.
    functions: list | None = None
    function_call: Any = None
    response_format: dict | None = None

    @field_validator("messages", mode="before")
    @classmethod
    def _messages(cls, v):
        return conversation(v, roles=OPENAI_ROLES)  # a MessageError names the message's field

    @model_validator(mode="after")
    def _unsupported(self):
        if self.top_logprobs and not self.logprobs:
            raise _field_error("top_logprobs", "top_logprobs requires logprobs to be true")
        if self.tools:
            raise _field_error("tools", "tool calling is not supported")
        if self.tool_choice not in (None, "none"):  # OpenAI and vLLM refuse it without tools too
            raise _field_error("tool_choice", "tool_choice needs tools, and tool calling is not supported")
        if self.functions:
            raise _field_error("functions", "function calling is not supported")
        if self.function_call not in (None, "none"):
            raise _field_error("function_call", "function_call needs functions, and function calling is not supported")
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise _field_error("response_format", 'only response_format type "text" is supported')
        return self

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def num_logprobs(self) -> int | None:
        """Top alternatives per token for SamplingParams.logprobs (None: no logprobs)."""
        return (self.top_logprobs or 0) if self.logprobs else None


class _FieldError(ValueError):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def _field_error(field: str, message: str) -> _FieldError:
    return _FieldError(field, message)


def _param_of(error: dict) -> str | None:
    """`messages[0].content` from a pydantic error location."""
    ctx_error = (error.get("ctx") or {}).get("error")
    if isinstance(ctx_error, (_FieldError, MessageError)):
        return ctx_error.field
    out = ""
    for part in error.get("loc", ()):
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("str", "list[str]", "list[int]", "function-after"):
            break  # a union member's tag, not a field
        elif not str(part).startswith(("function-", "json-or-python")):
            out += ("." if out else "") + str(part)
    return out or None


def parse_request(model: type[_Strict], body: Any) -> Any:
    """Validate a decoded JSON body; a 400 ApiError names the first bad field."""
    if not isinstance(body, dict):
        raise bad_request("request body must be a JSON object", code="invalid_body")
    try:
        return model.model_validate(body)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        param = _param_of(err)
        msg = err["msg"].removeprefix("Value error, ")
        raise bad_request(name_field(param, msg), param=param, code="invalid_value") from None
