"""Engine updates and results as OpenAI bodies: chat or text completions, whole or in chunks."""

from __future__ import annotations

import secrets
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence

from pydantic import BaseModel

from specdecode.decoding import GenerationResult, GenerationStats
from specdecode.sampling import TokenLogprob
from specdecode.server.engine import ChoiceUpdate, JobSpec
from specdecode.server.logprobs import (
    TextOffsets,
    TokenTexts,
    chat_logprobs,
    completion_logprobs,
)
from specdecode.server.schemas import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatDelta,
    ChatLogprobs,
    ChunkExtension,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    FinishReason,
    PromptTokensDetails,
    ResponseExtension,
    SpeculationStats,
    TextSegment,
    Usage,
)

_FINISH: dict[str, FinishReason] = {"eos": "stop", "stop_string": "stop", "length": "length"}


def speculation_stats(stats: GenerationStats) -> SpeculationStats:
    return SpeculationStats(
        tau=stats.tau,
        alpha=stats.alpha,
        drafted=stats.drafted,
        accepted=stats.accepted,
        free_drafted=stats.free_drafted,
        free_accepted=stats.free_accepted,
        target_passes=stats.target_passes,
        new_tokens=stats.new_tokens,
        cached_prompt_tokens=stats.cached_prompt_tokens,
        tokens_per_second=stats.tokens_per_second,
        time_to_first_token=stats.time_to_first_token,
        seconds=stats.total_seconds,
    )


def summed_stats(results: Iterable[GenerationResult]) -> SpeculationStats:
    """Statistics of several generations as if they were one (the first one's time to token)."""
    total = GenerationStats()
    for i, r in enumerate(results):
        s = r.stats
        total.new_tokens += s.new_tokens
        total.target_passes += s.target_passes
        total.drafted += s.drafted
        total.accepted += s.accepted
        total.rejected_rounds += s.rejected_rounds
        total.free_drafted += s.free_drafted
        total.free_accepted += s.free_accepted
        total.cached_prompt_tokens += s.cached_prompt_tokens
        total.total_seconds += s.total_seconds
        if i == 0:
            total.time_to_first_token = s.time_to_first_token
    return speculation_stats(total)


def finish_reason(result: GenerationResult) -> FinishReason:
    return _FINISH[result.finish_reason]


Results = Mapping[int, GenerationResult]  # by choice index


class ResponseFormat(ABC):
    """Builds the bodies of one request; subclasses give the chat or text shapes.

    ``texts`` shows tokens as text and bytes, for requests that ask for log-probabilities."""

    id_prefix = "cmpl"

    def __init__(self, model: str, spec: JobSpec, texts: TokenTexts | None = None) -> None:
        self.model = model
        self.spec = spec
        self.texts = texts
        self.id = f"{self.id_prefix}-{secrets.token_hex(12)}"

    def _texts(self) -> TokenTexts:
        if self.texts is None:
            raise RuntimeError("log-probabilities were asked for but the format has no tokenizer")
        return self.texts

    def usage(self, results: Results) -> Usage:
        completion = sum(len(r.token_ids) for r in results.values())
        prompt = self.spec.prompt_tokens
        # as prompt_tokens counts each prompt once, whatever n: the positions kept at each
        # prompt's first choice
        n = self.spec.samples_per_prompt
        cached = sum(r.stats.cached_prompt_tokens for i, r in results.items() if i % n == 0)
        return Usage(
            prompt_tokens=prompt,
            completion_tokens=completion,
            total_tokens=prompt + completion,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=cached),
        )

    def extension(self, results: Results) -> ResponseExtension:
        ordered = [results[i] for i in sorted(results)]
        return ResponseExtension(
            stats=summed_stats(ordered), choices=[speculation_stats(r.stats) for r in ordered]
        )

    @staticmethod
    def chunk_extension(update: ChoiceUpdate) -> ChunkExtension:
        result = update.result
        return ChunkExtension(
            tokens=update.token_ids,
            from_draft=update.from_draft,
            segments=[
                TextSegment(
                    text=p.text, from_draft=p.from_draft, copied=p.copied, logprob=p.logprob
                )
                for p in update.pieces
            ],
            tau=update.tau,
            tokens_per_second=update.tokens_per_second,
            stats=None if result is None else speculation_stats(result.stats),
        )

    def opening(self) -> list[BaseModel]:
        """Chunks sent before the first token."""
        return []

    @abstractmethod
    def chunk(self, update: ChoiceUpdate) -> BaseModel:
        """A stream chunk for one round (or the end) of a choice."""

    chunk_model: type[ChatCompletionChunk] | type[Completion]  # the stream chunk's schema

    def usage_chunk(self, results: Results) -> BaseModel:
        """The stream's last chunk when ``stream_options.include_usage`` is set."""
        return self.chunk_model(
            id=self.id,
            model=self.model,
            choices=[],
            usage=self.usage(results),
            specdecode=self.extension(results),
        )

    @abstractmethod
    def response(self, results: Results) -> BaseModel:
        """The whole response of a request that did not stream."""


class ChatFormat(ResponseFormat):
    id_prefix = "chatcmpl"
    chunk_model = ChatCompletionChunk

    def opening(self) -> list[BaseModel]:
        """The first chunk of every choice gives the role, as the OpenAI API does."""
        return [
            ChatCompletionChunk(
                id=self.id,
                model=self.model,
                choices=[
                    ChatChunkChoice(index=c.index, delta=ChatDelta(role="assistant", content=""))
                ],
            )
            for c in self.spec.choices
        ]

    def _logprobs(self, logprobs: Sequence[TokenLogprob] | None) -> ChatLogprobs | None:
        return None if logprobs is None else chat_logprobs(self._texts(), logprobs)

    def chunk(self, update: ChoiceUpdate) -> BaseModel:
        finish = None if update.result is None else finish_reason(update.result)
        choice = ChatChunkChoice(
            index=update.index,
            delta=ChatDelta(content=update.text),
            finish_reason=finish,
            logprobs=self._logprobs(update.logprobs or None),
        )
        return ChatCompletionChunk(
            id=self.id, model=self.model, choices=[choice], specdecode=self.chunk_extension(update)
        )

    def response(self, results: Results) -> BaseModel:
        choices = [
            ChatChoice(
                index=i,
                message=AssistantMessage(content=results[i].text),
                finish_reason=finish_reason(results[i]),
                logprobs=self._logprobs(results[i].logprobs),
            )
            for i in sorted(results)
        ]
        return ChatCompletion(
            id=self.id,
            model=self.model,
            choices=choices,
            usage=self.usage(results),
            specdecode=self.extension(results),
        )


class CompletionFormat(ResponseFormat):
    chunk_model = Completion

    def __init__(self, model: str, spec: JobSpec, texts: TokenTexts | None = None) -> None:
        super().__init__(model, spec, texts)
        self._offsets: dict[int, TextOffsets] = {}  # per choice: where its tokens start
        self._echoed: set[int] = set()  # streamed choices whose prompt went out (echo)

    def _logprobs(
        self,
        logprobs: Sequence[TokenLogprob] | None,
        index: int,
        prompt: Sequence[TokenLogprob] | None = None,
    ) -> CompletionLogprobs | None:
        """The choice's entries; with ``prompt`` (echo), its prompt's come first."""
        if logprobs is None:
            return None
        first = None if prompt is None else self.spec.choices[index].prompt_ids[0]
        texts = self._texts()
        if index not in self._offsets:
            start = len(self._echo(index))
            self._offsets[index] = TextOffsets(texts.tokenizer, start)
        return completion_logprobs(texts, logprobs, self._offsets[index], first, prompt or ())

    def _echo(self, index: int) -> str:
        return self.spec.echo[index] if self.spec.echo else ""

    def chunk(self, update: ChoiceUpdate) -> BaseModel:
        finish = None if update.result is None else finish_reason(update.result)
        text, logprobs, prompt = update.text, update.logprobs or None, None
        if self.spec.echo and update.index not in self._echoed:  # the choice's first chunk
            self._echoed.add(update.index)
            text = self._echo(update.index) + text
            prompt = update.prompt_logprobs
            if prompt is not None:
                logprobs = logprobs or ()
        choice = CompletionChoice(
            index=update.index,
            text=text,
            finish_reason=finish,
            logprobs=self._logprobs(logprobs, update.index, prompt),
        )
        return Completion(
            id=self.id, model=self.model, choices=[choice], specdecode=self.chunk_extension(update)
        )

    def response(self, results: Results) -> BaseModel:
        choices = [
            CompletionChoice(
                index=i,
                text=self._echo(i) + results[i].text,
                finish_reason=finish_reason(results[i]),
                logprobs=self._logprobs(
                    results[i].logprobs, i, results[i].prompt_logprobs if self.spec.echo else None
                ),
            )
            for i in sorted(results)
        ]
        return Completion(
            id=self.id,
            model=self.model,
            choices=choices,
            usage=self.usage(results),
            specdecode=self.extension(results),
        )
