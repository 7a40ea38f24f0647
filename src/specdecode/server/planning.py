"""From a validated request body to a :class:`JobSpec`: prompts as token ids, options, seeds.

Everything a request can get wrong is found here, before it waits in the queue: an unknown model
name (404), a prompt that is empty, too long for the context or holds ids outside the vocabulary,
a message the chat template refuses, sampling values that contradict each other (400).
"""

from __future__ import annotations

import dataclasses
import secrets
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from specdecode.constraints import Grammar
from specdecode.decoding import SpeculativeGenerator, resolve_request, sample_seed
from specdecode.errors import GrammarError, InvalidSettingsError, PromptError
from specdecode.sampling.settings import as_logit_bias
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
        refuse_unsupported(body)
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
        refuse_unsupported(body)
        if body.max_tokens == 0 and not (body.echo and body.logprobs is not None):
            raise bad_request(
                "max_tokens 0 asks for no answer: it only scores a prompt, with echo: true and "
                "logprobs set; ask for at least 1 token otherwise",
                "max_tokens",
            )
        with self._lock:
            prompts = self._prompts(body.prompt)
        spec = self._plan(body, prompts, body.max_tokens, param="prompt", logprobs=body.logprobs)
        if not body.echo:
            return spec
        with self._lock:
            texts = self._echo_texts(body.prompt, prompts)
        per_choice = tuple(texts[c.index // body.n] for c in spec.choices)
        return dataclasses.replace(spec, echo=per_choice)

    def _echo_texts(self, prompt: Any, prompts: list[list[int]]) -> list[str]:
        """Each prompt as the answer repeats it (echo): as sent, or decoded when sent as ids."""
        if isinstance(prompt, str):
            return [prompt]
        if prompt and isinstance(prompt[0], str):
            return list(prompt)
        return [str(self.tokenizer.decode(ids)) for ids in prompts]

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
        plain = []
        for i, message in enumerate(messages):
            if message.tool_calls:
                raise bad_request(_NO_TOOLS, f"messages[{i}].tool_calls")
            entry = {"role": message.role, "content": _content(message, i)}
            if message.name is not None:
                entry["name"] = _text(message.name, f"messages[{i}].name")
            plain.append(entry)
        try:
            encoded = self.tokenizer.apply_chat_template(
                plain, add_generation_prompt=True, tokenize=True, return_dict=True
            )
        except Exception as exc:  # jinja's TemplateError and whatever a template raises
            refused = f"the chat template refused these messages: {exc}"
            raise bad_request(refused, "messages") from exc
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
        return [self._encode(p) if isinstance(p, str) else list(p) for p in texts_or_ids]

    def _encode(self, text: str) -> list[int]:
        text = _text(text, "prompt")
        try:
            return list(self.tokenizer(text)["input_ids"])
        except Exception as exc:  # whatever the tokenizer refuses is the prompt's fault
            raise bad_request(f"the tokenizer refused the prompt: {exc}", "prompt") from exc

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
        requested = requested_grammar(body)
        options = self._options(body, max_tokens, logprobs, requested.grammar)
        self._check_options(options, max(len(ids) for ids in prompts), requested.field)
        base_seed = body.seed if body.seed is not None else secrets.randbits(63)
        choices = tuple(
            ChoiceSpec(index=p * body.n + i, prompt_ids=tuple(ids), seed=sample_seed(base_seed, i))
            for p, ids in enumerate(prompts)
            for i in range(body.n)
        )
        prompt_tokens = sum(len(ids) for ids in prompts)
        return JobSpec(
            choices=choices,
            options=options,
            prompt_tokens=prompt_tokens,
            samples_per_prompt=body.n,
        )

    def _options(
        self,
        body: GenerationFields,
        max_tokens: int | None,
        logprobs: int | None,
        grammar: Grammar | None,
    ) -> GenerationOptions:
        stop = body.stop
        stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
        for i, s in enumerate(stops):
            _text(s, f"stop[{i}]")
        try:
            logit_bias = as_logit_bias(body.logit_bias)
        except InvalidSettingsError as exc:
            raise bad_request(str(exc), "logit_bias") from exc
        outside = [t for t, _ in logit_bias if t >= self.vocab_size]
        if outside:
            raise bad_request(
                f"logit_bias names token {outside[0]}, outside the vocabulary (0 to "
                f"{self.vocab_size - 1})",
                "logit_bias",
            )
        return GenerationOptions(
            temperature=(
                self.settings.default_temperature if body.temperature is None else body.temperature
            ),
            max_new_tokens=max_tokens,
            top_p=body.top_p,
            top_k=body.top_k,
            min_p=body.min_p,
            repetition_penalty=body.repetition_penalty,
            presence_penalty=body.presence_penalty,
            frequency_penalty=body.frequency_penalty,
            logit_bias=logit_bias,
            stop=stops,
            seeded=body.seed is not None,
            logprobs=logprobs,
            prompt_logprobs=logprobs if getattr(body, "echo", False) else None,
            grammar=grammar,
        )

    def _check_options(
        self, options: GenerationOptions, prompt_length: int, grammar_param: str
    ) -> None:
        """Resolve the options as the loop will, so that bad values fail now with a 400
        (``grammar_param``: the field a grammar came from)."""
        kwargs: dict[str, Any] = options.loop_kwargs()
        kwargs.pop("logprobs")  # output options, checked by the schema
        grammar = kwargs.pop("grammar")
        scores_prompt = kwargs.pop("prompt_logprobs") is not None
        try:
            request = resolve_request(
                self.generator.target, prompt_length, scores_prompt=scores_prompt, **kwargs
            )
        except InvalidSettingsError as exc:
            raise bad_request(str(exc)) from exc
        if grammar is None:
            return
        try:  # the first grammar reads the vocabulary (about a second for 150k tokens)
            with self._lock:
                compiler = self.generator.grammar_compiler()
                compiler.check(grammar, sorted(request.eos_token_ids))
        except GrammarError as exc:
            raise bad_request(str(exc), grammar_param) from exc


_NO_TOOLS = (
    "function calling (tools, tool_calls, functions) is not supported by this server: it "
    "generates text only; describe the tools in a message and parse the answer yourself"
)


def refuse_unsupported(body: ChatCompletionRequest | CompletionRequest) -> None:
    """A 400 for each OpenAI field this server knows but cannot honour, when the request sets
    it to anything that would change the answer: ignoring it would answer another question."""
    if body.best_of is not None and body.best_of != body.n:
        raise bad_request(
            "best_of is not supported: ask for n choices and pick among them", "best_of"
        )
    if isinstance(body, ChatCompletionRequest):
        if body.tools or body.functions:
            raise bad_request(_NO_TOOLS, "tools" if body.tools else "functions")
        for name in ("tool_choice", "function_call"):
            if getattr(body, name) not in (None, "none", "auto"):
                raise bad_request(_NO_TOOLS, name)
        return
    if body.suffix:
        raise bad_request("suffix (insertion) is not supported by this server", "suffix")


_STRUCTURED = ("json", "regex", "choice", "grammar", "json_object")


@dataclass(frozen=True)
class RequestedGrammar:
    """The grammar a request constrains its output to (None: none), and the request field it
    came from, which errors name."""

    grammar: Grammar | None
    field: str


def requested_grammar(body: GenerationFields) -> RequestedGrammar:
    """OpenAI's ``response_format`` or vLLM's ``structured_outputs`` (one of them; a 400 saying
    what is wrong otherwise)."""
    grammar = _response_format(body.response_format)
    structured = _structured_outputs(_with_guided(body))
    if grammar is not None and structured is not None:
        raise bad_request(
            "response_format and structured_outputs both constrain the output: send one",
            "structured_outputs",
        )
    if grammar is not None:
        return RequestedGrammar(grammar, "response_format")
    return RequestedGrammar(structured, "structured_outputs")


_GUIDED = {
    "guided_json": "json",
    "guided_regex": "regex",
    "guided_choice": "choice",
    "guided_grammar": "grammar",
    "guided_whitespace_pattern": "whitespace_pattern",
}


def _with_guided(body: GenerationFields) -> dict[str, Any] | None:
    """``structured_outputs``, or vLLM's older ``guided_*`` fields under its names."""
    guided = {new: getattr(body, old) for old, new in _GUIDED.items()}
    guided = {key: value for key, value in guided.items() if value is not None}
    if not guided:
        return body.structured_outputs
    if body.structured_outputs:
        raise bad_request(
            "structured_outputs and guided_* fields both constrain the output: send "
            "structured_outputs alone (vLLM's guided_* fields are its older names)",
            "structured_outputs",
        )
    return guided


def _response_format(value: dict[str, Any] | None) -> Grammar | None:
    kind = (value or {}).get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return Grammar.json_object()
    if kind != "json_schema":
        raise bad_request(
            f"response_format type {kind!r} is not supported: use text, json_object or json_schema",
            "response_format",
        )
    spec = (value or {}).get("json_schema")
    schema = spec.get("schema") if isinstance(spec, dict) else None
    if not isinstance(schema, dict | bool):
        raise bad_request(
            'response_format json_schema needs {"json_schema": {"name": ..., "schema": '
            "{...}}} with the schema as an object",
            "response_format",
        )
    return _build(Grammar.json_schema, schema, "response_format")


def _structured_outputs(value: dict[str, Any] | None) -> Grammar | None:
    if not value:
        return None
    given = [key for key, item in value.items() if item not in (None, False)]
    unknown = [key for key in given if key not in _STRUCTURED]
    if unknown:
        raise bad_request(
            f"structured_outputs.{unknown[0]} is not supported: use one of "
            f"{', '.join(_STRUCTURED)}",
            "structured_outputs",
        )
    if len(given) != 1:
        raise bad_request(
            f"structured_outputs takes exactly one of {', '.join(_STRUCTURED)}, got "
            f"{', '.join(given) or 'none'}",
            "structured_outputs",
        )
    key = given[0]
    item = value[key]
    param = f"structured_outputs.{key}"
    if key == "json_object":
        return Grammar.json_object()
    if key == "json":
        return _build(Grammar.json_schema, item, param)
    if key == "choice":
        if not isinstance(item, list) or not all(isinstance(c, str) for c in item):
            raise bad_request("structured_outputs.choice is a list of strings", param)
        return _build(Grammar.choice, item, param)
    if not isinstance(item, str):
        raise bad_request(f"{param} is a string", param)
    return _build(Grammar.regex if key == "regex" else Grammar.lark, item, param)


def _build(make: Any, value: Any, param: str) -> Grammar:
    try:
        return make(value)  # type: ignore[no-any-return]
    except GrammarError as exc:
        raise bad_request(str(exc), param) from exc


def _text(value: str, param: str) -> str:
    """``value``, unless it cannot be encoded (a lone UTF-16 surrogate such as ``\\ud800``)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise bad_request(
            f"{param} holds a lone UTF-16 surrogate ({value[exc.start : exc.end]!a}), which is "
            "not a character: send valid Unicode",
            param,
        ) from exc
    return value


def _content(message: ChatMessage, index: int) -> str:
    param = f"messages[{index}].content"
    if message.content is None or isinstance(message.content, str):
        return _text(message.content or "", param)
    texts = []
    for part in message.content:
        if part.type != "text":
            raise bad_request(
                f"content parts of type {part.type!r} are not supported: this server takes text",
                param,
            )
        if part.text is None:
            raise bad_request('a content part of type "text" needs a "text" field', param)
        texts.append(_text(part.text, param))
    return "".join(texts)
