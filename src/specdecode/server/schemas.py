"""Request and response bodies in the OpenAI API's shapes (pydantic), apart from any logic.

Requests ignore fields they do not know, as the OpenAI API does, and are strict about types:
``"max_tokens": "5"`` is an error, not 5. Responses add one field the OpenAI API lacks,
``specdecode``, which OpenAI clients ignore: speculation statistics, and in stream chunks the
tokens of the chunk with, per token, whether it came from the draft.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_serializer

MAX_STOP_STRINGS = 4  # as in the OpenAI API
MAX_TOP_LOGPROBS = 20  # alternatives per token (OpenAI: 20 for chat, 5 for text completions)


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)


class StreamOptions(_Request):
    include_usage: bool = False  # a last chunk with ``usage`` and no choices


class TextPart(_Request):
    """One part of a message's content given as a list (``{"type": "text", "text": ...}``)."""

    type: str
    text: str | None = None


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[Any] | None = None  # refused when not empty: no function calling here


class GenerationFields(_Request):
    """Fields common to chat and text completions."""

    model: str
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None  # unset: server's default
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    top_k: Annotated[int, Field(ge=0)] | None = None  # not in the OpenAI API; 0 disables
    min_p: Annotated[float, Field(ge=0, le=1)] | None = None  # not in the OpenAI API
    repetition_penalty: Annotated[float, Field(gt=0)] | None = None  # not in the OpenAI API
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    # token id (a string of digits, as JSON keys are) -> added to its logit
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None
    seed: int | None = None
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP_STRINGS)] | None = None
    n: Annotated[int, Field(ge=1)] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    # constrained output: OpenAI's {"type": "json_object"} or {"type": "json_schema",
    # "json_schema": {"schema": ...}}; vLLM's {"json": ...}, {"regex": ...}, {"choice": [...]},
    # {"grammar": ...} (Lark) or {"json_object": true} (planning.py turns them into a Grammar)
    response_format: dict[str, Any] | None = None
    structured_outputs: dict[str, Any] | None = None
    # vLLM's fields before structured_outputs (removed in its 0.12), taken as their new names
    guided_json: dict[str, Any] | bool | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_whitespace_pattern: str | None = None  # refused: llguidance's JSON whitespace is fixed
    guided_decoding_backend: str | None = None  # ignored: there is one backend
    # Known and refused when set to anything that would change the answer (planning.py):
    # silently ignoring them would give a client an answer to another question.
    best_of: int | None = None

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class ChatCompletionRequest(GenerationFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None  # wins over max_tokens
    logprobs: bool | None = None  # each token's log-probability in ``choices[i].logprobs``
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None  # needs logprobs
    tools: list[Any] | None = None  # refused when not empty, as are the ones below
    tool_choice: str | dict[str, Any] | None = None
    functions: list[Any] | None = None
    function_call: str | dict[str, Any] | None = None


class CompletionRequest(GenerationFields):
    # One prompt or several: text, texts, token ids, or lists of token ids.
    prompt: str | list[str] | list[int] | list[list[int]]
    # each token's log-probability and this many alternatives (0: the chosen token's alone)
    logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    echo: bool | None = None  # the prompt before the answer (with logprobs: the prompt's too)
    # 0: no answer, only the echoed prompt and its log-probabilities (scoring a text)
    max_tokens: Annotated[int, Field(ge=0)] | None = None
    suffix: str | None = None  # refused when set


# ----------------------------------------------------------------------------- responses
def _now() -> int:
    return int(time.time())


class PromptTokensDetails(BaseModel):
    cached_tokens: int  # prompt positions whose KV cache was kept from the previous request


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class SpeculationStats(BaseModel):
    """Speculation statistics of one generation, or summed over several."""

    tau: float  # new tokens per target forward pass (plain decoding: 1)
    alpha: float | None  # acceptance rate of drafted tokens (None: nothing was drafted)
    drafted: int  # tokens proposed by the drafter
    accepted: int  # drafted tokens the target kept
    # of those, the ones copied by prompt lookup in front of a model (--draft M --prompt-lookup)
    free_drafted: int = 0
    free_accepted: int = 0
    target_passes: int  # target forward passes, prefill included
    new_tokens: int
    cached_prompt_tokens: int = 0  # prompt positions kept from the previous request's cache
    tokens_per_second: float
    time_to_first_token: float  # seconds from the start of the generation (queue wait excluded)
    seconds: float  # generation time


class TextSegment(BaseModel):
    """A piece of streamed text and where its token came from."""

    text: str
    from_draft: bool  # True: drafted and accepted; False: the target's own token
    copied: bool = False  # drafted by prompt lookup, not by the draft model (with from_draft)
    logprob: float | None = None  # the target's, when the request asked for logprobs


class ChunkExtension(BaseModel):
    """The ``specdecode`` field of a stream chunk."""

    tokens: list[int]  # token ids generated in this round
    from_draft: list[bool]  # per token of ``tokens``
    segments: list[TextSegment]  # the chunk's text, split by the token each piece came from
    tau: float  # running tau of this choice
    tokens_per_second: float  # running rate of this choice
    stats: SpeculationStats | None = None  # on the chunk that finishes a choice, and with usage


class ResponseExtension(BaseModel):
    """The ``specdecode`` field of a whole response: totals, then each choice's statistics."""

    stats: SpeculationStats
    choices: list[SpeculationStats]


FinishReason = Literal["stop", "length"]


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]  # the token's bytes (UTF-8 for whole characters)


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]  # the most likely tokens at this position, best first


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob]
    refusal: None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]  # None: an echoed prompt's first token
    top_logprobs: list[dict[str, float] | None]  # the alternatives asked for, and the chosen token
    text_offset: list[int]  # where each token starts in ``text``


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: FinishReason
    logprobs: ChatLogprobs | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatChoice]
    usage: Usage
    specdecode: ResponseExtension


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer
    def _present_only(self) -> dict[str, str]:
        """A delta holds only what it changes, as in the OpenAI API."""
        return {k: v for k, v in (("role", self.role), ("content", self.content)) if v is not None}


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    finish_reason: FinishReason | None = None
    logprobs: ChatLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    specdecode: ChunkExtension | ResponseExtension | None = None  # the latter with ``usage``


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: FinishReason | None = None
    logprobs: CompletionLogprobs | None = None


class Completion(BaseModel):
    """A text completion, and (``object`` aside) a chunk of a streamed one."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    specdecode: ResponseExtension | ChunkExtension | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=_now)
    owned_by: str = "specdecode"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    model: str
    waiting: int  # requests in the queue
    running: int  # 0 or 1: one model, one generation at a time


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody
