"""From a validated request body to a :class:`JobSpec`: prompts as token ids, options, seeds.

Everything a request can get wrong is found here, before it waits in the queue: an unknown model
name (404), a prompt that is empty, too long for the context or holds ids outside the vocabulary,
a message the chat template refuses, sampling values that contradict each other (400).
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Sequence
from typing import Any

from specdecode.decoding import SpeculativeGenerator, resolve_request, sample_seed
from specdecode.errors import InvalidSettingsError, PromptError
from specdecode.server.engine import ChoiceSpec, GenerationOptions, JobSpec
from specdecode.server.errors import bad_request, model_not_found
from specdecode.server.logprobs import TokenTexts
from specdecode.server.schemas import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    GenerationFields,
)
from specdecode.server.settings import ServerSettings


class RequestPlanner:
    """Turns request bodies into jobs for one generator.

    Called from the server's thread pool, several requests at once; a lock keeps them from
    using the (Rust, not re-entrant for writes) fast tokenizer at the same time.
    """

    def __init__(self, generator: SpeculativeGenerator, settings: ServerSettings) -> None:
        self.generator = generator
        self.settings = settings
        self.tokenizer = generator.target.tokenizer
        self.token_texts = TokenTexts(self.tokenizer)  # tokens shown in log-probabilities
        self.vocab_size = int(generator.target.model.get_input_embeddings().num_embeddings)
        self._lock = threading.Lock()

    def chat(self, body: ChatCompletionRequest) -> JobSpec:
        self.check_model(body.model)
        with self._lock:
            ids = self._template(body.messages)
        max_tokens = body.max_completion_tokens or body.max_tokens
        if body.top_logprobs is not None and not body.logprobs:
            raise bad_request(
                'top_logprobs needs logprobs: set "logprobs": true as well', "top_logprobs"
            )
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        return self._plan(body, [ids], max_tokens, param="messages", logprobs=logprobs)

    def completion(self, body: CompletionRequest) -> JobSpec:
        self.check_model(body.model)
        with self._lock:
            prompts = self._prompts(body.prompt)
        return self._plan(body, prompts, body.max_tokens, param="prompt", logprobs=body.logprobs)

    # ----------------------------------------------------------------------------- prompts
    def check_model(self, name: str) -> None:
        """404 unless ``name`` is the served model's name (no request ever names a path)."""
        if name != self.settings.served_model_name:
            raise model_not_found(name, self.settings.served_model_name)

    def _template(self, messages: Sequence[ChatMessage]) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise bad_request(
                "this model's tokenizer has no chat template: use POST /v1/completions with the "
                "prompt written in the model's own format",
                param="messages",
            )
        plain = [{"role": m.role, "content": _content(m, i)} for i, m in enumerate(messages)]
        try:
            encoded = self.tokenizer.apply_chat_template(
                plain, add_generation_prompt=True, tokenize=True, return_dict=True
            )
        except Exception as exc:  # jinja's TemplateError and whatever a template raises
            message = f"the chat template refused these messages: {exc}"
            raise bad_request(message, "messages") from exc
        return [int(i) for i in encoded["input_ids"]]

    def _prompts(self, prompt: str | list[str] | list[int] | list[list[int]]) -> list[list[int]]:
        """One list of ids per prompt (pydantic has checked that a list is all of one kind)."""
        if isinstance(prompt, str):
            prompt = [prompt]
        if prompt and isinstance(prompt[0], int):
            return [[int(i) for i in prompt]]
        texts_or_ids: list[str] | list[list[int]] = prompt  # type: ignore[assignment]
        if any(p == "" for p in texts_or_ids):
            raise bad_request("the prompt is empty: give some text to continue", "prompt")
        return [
            list(self.tokenizer(p)["input_ids"]) if isinstance(p, str) else list(p)
            for p in texts_or_ids
        ]

    def _check_ids(self, ids: list[int], param: str) -> list[int]:
        if not ids:
            raise bad_request("the prompt is empty: give some text to continue", param)
        bad = next((i for i in ids if not 0 <= i < self.vocab_size), None)
        if bad is not None:
            raise bad_request(
                f"token id {bad} is outside the vocabulary (0 to {self.vocab_size - 1})", param
            )
        try:
            return self.generator.encode(ids)
        except PromptError as exc:
            raise bad_request(str(exc), param, code="context_length_exceeded") from exc

    # ----------------------------------------------------------------------------- the plan
    def _plan(
        self,
        body: GenerationFields,
        prompts: list[list[int]],
        max_tokens: int | None,
        param: str,
        logprobs: int | None = None,
    ) -> JobSpec:
        total = len(prompts) * body.n
        if total > self.settings.max_choices:
            raise bad_request(
                f"{total} choices asked for ({len(prompts)} prompt(s) x n={body.n}) but this "
                f"server allows at most {self.settings.max_choices} per request",
                "n",
            )
        if not prompts:
            raise bad_request("the prompt is empty: give some text to continue", param)
        prompts = [self._check_ids(ids, param) for ids in prompts]
        options = self._options(body, max_tokens, logprobs)
        self._check_options(options, max(len(ids) for ids in prompts))
        base_seed = body.seed if body.seed is not None else secrets.randbits(63)
        choices = tuple(
            ChoiceSpec(index=p * body.n + i, prompt_ids=tuple(ids), seed=sample_seed(base_seed, i))
            for p, ids in enumerate(prompts)
            for i in range(body.n)
        )
        prompt_tokens = sum(len(ids) for ids in prompts)
        return JobSpec(choices=choices, options=options, prompt_tokens=prompt_tokens)

    def _options(
        self, body: GenerationFields, max_tokens: int | None, logprobs: int | None
    ) -> GenerationOptions:
        stop = body.stop
        return GenerationOptions(
            temperature=(
                self.settings.default_temperature if body.temperature is None else body.temperature
            ),
            max_new_tokens=max_tokens,
            top_p=body.top_p,
            top_k=body.top_k,
            min_p=body.min_p,
            repetition_penalty=body.repetition_penalty,
            stop=(stop,) if isinstance(stop, str) else tuple(stop or ()),
            seeded=body.seed is not None,
            logprobs=logprobs,
        )

    def _check_options(self, options: GenerationOptions, prompt_length: int) -> None:
        """Resolve the options as the loop will, so that bad values fail now with a 400."""
        kwargs: dict[str, Any] = options.loop_kwargs()
        kwargs.pop("logprobs")  # an output option, checked by the schema
        try:
            resolve_request(self.generator.target, prompt_length, **kwargs)
        except InvalidSettingsError as exc:
            raise bad_request(str(exc)) from exc


def _content(message: ChatMessage, index: int) -> str:
    if message.content is None or isinstance(message.content, str):
        return message.content or ""
    texts = []
    for part in message.content:
        if part.type != "text" or part.text is None:
            raise bad_request(
                f"content parts of type {part.type!r} are not supported: this server takes text",
                f"messages[{index}].content",
            )
        texts.append(part.text)
    return "".join(texts)
