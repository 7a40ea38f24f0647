"""The decoding loop: the one place that combines drafter, target, verification and stopping.

Each round: the drafter proposes up to k tokens; the target scores all of them in one forward
pass; the greedy rule or speculative sampling keeps a prefix and adds one token of the target's
own; rejected positions are rolled out of the target's KV cache. The loop yields a
:class:`RoundEvent` per target pass and a :class:`FinishEvent` at the end. It never prints.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import secrets
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from specdecode.constraints import Grammar, GrammarCompiler
from specdecode.decoding.config import GenerationRequest, resolve_request, resolve_sampling_mode
from specdecode.decoding.events import (
    FinishEvent,
    FinishReason,
    GenerationEvent,
    GenerationResult,
    GenerationStats,
    RoundEvent,
)
from specdecode.decoding.text import TextStream
from specdecode.decoding.transformers_args import DraftingOverrides, split_call
from specdecode.drafters import EMPTY_DRAFT, Draft, Drafter, DraftLength, FixedLength
from specdecode.drafters.base import begin_sequence
from specdecode.errors import InvalidSettingsError, PromptError
from specdecode.models import LoadedModel, Session
from specdecode.models.costs import PassCosts, can_pad, pass_costs_for
from specdecode.models.timing import synchronize
from specdecode.sampling import (
    SeededSampler,
    TokenLogprob,
    TokenSampler,
    greedy,
    to_probs,
    token_logprobs,
)
from specdecode.verify import Verdict, greedy_verify, seeded_verify, speculative_sample

# positions reserved beyond prompt + max_new_tokens: a padded pass's filler (at most 16 tokens)
PASS_SLACK = 32
# plain greedy decoding on a GPU: tokens chosen on the device per read back (see tokens_per_sync)
GPU_TOKENS_PER_SYNC = 8
# prompt positions per prefill pass when the prompt's log-probabilities are asked for
PROMPT_CHUNK = 512


def sample_seed(seed: int, index: int) -> int:
    """The seed of the ``index``-th of several independent samples drawn with ``seed``."""
    if index == 0:
        return seed
    digest = hashlib.sha256(f"specdecode:{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class SpeculativeGenerator:
    """Generates with a target model and an optional drafter; output is the target's alone.

    Args:
        target: the model whose output distribution is kept exactly.
        drafter: proposes tokens (None: plain decoding on the same code path).
        draft_length: tokens drafted per round: an int for a constant k, or a policy.
        pass_costs: the target's pass costs by size (:mod:`specdecode.models.costs`); when None,
            they are measured at the first generation with a drafter if padding is on or the
            policy needs them (``auto``).
        pad_passes: with pass costs at hand, pad each verification pass with filler tokens up
            to the cheapest size (never changes the output: attention is causal and the
            filler is rolled back with the rejected drafts).
        tokens_per_sync: plain greedy decoding (no drafter, no repetition penalty) chooses this
            many tokens on the device, each fed back without leaving it, before reading them
            back in one synchronisation (``Session.greedy_extend``), so that a GPU does not wait
            for the host between steps. The same tokens; they still come as one event each, in
            bursts. At most ``tokens_per_sync - 1`` steps past an end of sequence are computed
            and dropped. None: 8 on a CUDA device, 1 (a read back per token) elsewhere, where
            the host waits for each step anyway.
        reuse_prompt_cache: keep the KV cache of the previous generation's positions whose ids
            begin the new prompt (a chat's history, the same prompt for several samples), and
            prefill only the rest, in the target and in a draft model; the stats count them as
            ``cached_prompt_tokens``. Off by default: the reused positions were computed in
            other passes than a one-shot prefill, so float rounding may differ at the last bit
            (what the server accepts for the time it saves; a benchmark must not skip prefills).
    """

    def __init__(
        self,
        target: LoadedModel,
        drafter: Drafter | None = None,
        draft_length: DraftLength | int = 5,
        *,
        pass_costs: PassCosts | None = None,
        pad_passes: bool = True,
        tokens_per_sync: int | None = None,
        reuse_prompt_cache: bool = False,
    ) -> None:
        if tokens_per_sync is not None and tokens_per_sync < 1:
            raise InvalidSettingsError(
                f"tokens_per_sync must be at least 1 (1 reads every token back), got "
                f"{tokens_per_sync}"
            )
        self.target = target
        self.drafter = drafter
        self.schedule = FixedLength(draft_length) if isinstance(draft_length, int) else draft_length
        self.session: Session = target.new_session()
        self.pass_costs = pass_costs
        self.pad_passes = pad_passes
        if tokens_per_sync is None:
            tokens_per_sync = GPU_TOKENS_PER_SYNC if self.session.device.type == "cuda" else 1
        self.tokens_per_sync = tokens_per_sync
        self.reuse_prompt_cache = reuse_prompt_cache
        self._caches_suspect = False  # a generation failed mid-pass: prefill the next whole
        self.last_pass_size = 0  # tokens fed in the latest target pass, filler included
        if pass_costs is not None:
            self.schedule.use_costs(pass_costs, pad_passes)
        if drafter is not None:
            drafter.bind(self.session)
        head = target.model.get_output_embeddings()  # nn.Linear, int8 or oneDNN-packed
        self.vocab_size = int(getattr(head, "out_features", 0) or head.weight.shape[0])
        self._grammars: GrammarCompiler | None = None  # made at the first grammar asked for

    # ----------------------------------------------------------------------------- prompts
    def encode(self, prompt: str | Sequence[int], chat: bool = False) -> list[int]:
        """Token ids for ``prompt`` (a string, or ids as given); ``chat`` applies the template."""
        if isinstance(prompt, str):
            if not prompt:
                raise PromptError("the prompt is empty: give some text to continue")
            tok = self.target.tokenizer
            if chat:
                if not getattr(tok, "chat_template", None):
                    raise PromptError(
                        f"{self.target.name}'s tokenizer has no chat template: drop --chat "
                        "and write the prompt in the model's own format"
                    )
                messages = [{"role": "user", "content": prompt}]
                ids = _as_id_list(
                    tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
                )
            else:
                ids = list(tok(prompt)["input_ids"])
        else:
            ids = [int(i) for i in prompt]
        if not ids:
            raise PromptError("the prompt is empty: give some text to continue")
        limit = self.target.max_context
        if limit is not None and len(ids) >= limit:
            raise PromptError(
                f"the prompt has {len(ids)} tokens but {self.target.name} takes at most {limit} "
                "(prompt and output together): shorten the prompt"
            )
        return ids

    # ----------------------------------------------------------------------------- public API
    def generate(self, prompt: Any = None, **kwargs: Any) -> GenerationResult:
        """Generate to the end and return the result (see :meth:`stream` for arguments)."""
        for event in self.stream(prompt, **kwargs):
            if isinstance(event, FinishEvent):
                return event.result
        raise RuntimeError("the decoding loop ended without a result")  # pragma: no cover

    def stream(
        self,
        prompt: Any = None,
        *,
        chat: bool = False,
        seed: int | None = None,
        should_stop: Callable[[], bool] | None = None,
        sampling_mode: str | None = None,
        logprobs: int | None = None,
        prompt_logprobs: int | None = None,
        grammar: Grammar | None = None,
        **generation_kwargs: Any,
    ) -> Iterator[GenerationEvent]:
        """Yield a :class:`RoundEvent` per target pass, then a :class:`FinishEvent`.

        Keyword arguments are transformers' names: ``max_new_tokens``, ``do_sample``,
        ``temperature``, ``top_k``, ``top_p``, ``min_p``, ``repetition_penalty``, and the
        OpenAI API's ``presence_penalty``, ``frequency_penalty``, ``logit_bias``,
        ``eos_token_id``, ``stop_strings`` (or ``stop``), ``generation_config``. Unset ones come
        from the model's generation config, then transformers' defaults. ``should_stop`` is
        polled between rounds (a disconnected client, a timeout).

        The prompt may also be given as transformers takes it (``input_ids=``, with
        ``attention_mask=``, or a ``BatchEncoding``), and transformers' assisted-generation
        settings apply to this call (see :mod:`specdecode.decoding.transformers_args`).

        ``sampling_mode`` (when sampling): ``"seeded"`` makes the output a function of the seed,
        prompt, settings and target alone, whatever the drafter and draft length;
        ``"rejection"`` is standard speculative sampling (higher acceptance); ``"auto"`` or None
        (the default) is seeded when ``seed`` is given, rejection otherwise.

        ``logprobs``: give each new token's log-probability under the target's raw distribution
        (before any penalty, grammar, temperature or truncation) and this many most likely
        alternatives (0: the chosen token's alone), in ``RoundEvent.logprobs`` and
        ``GenerationResult.logprobs``.
        Read from the passes that chose the tokens: no extra pass. ``prompt_logprobs``: the same
        for the prompt's tokens (each after the first, given those before it), in the first
        ``RoundEvent`` and ``GenerationResult.prompt_logprobs``: the prefill then computes the
        output head at every prompt position, ``PROMPT_CHUNK`` positions a pass. With
        ``max_new_tokens=0`` (allowed only then) nothing is generated: the prompt is scored.
        """
        top_logprobs = self._check_logprobs(logprobs)
        top_prompt = self._check_logprobs(prompt_logprobs, "prompt_logprobs")
        call = split_call(prompt, generation_kwargs)
        prompt_ids = self.encode(call.prompt, chat=chat)
        mode = resolve_sampling_mode(sampling_mode, seed_given=seed is not None)
        request = resolve_request(
            self.target,
            len(prompt_ids),
            sampling_mode=mode,
            scores_prompt=top_prompt is not None,
            **call.request_kwargs(len(prompt_ids)),
        )
        biased = [t for t, _ in request.sampling.logit_bias if t >= self.vocab_size]
        if biased:
            raise InvalidSettingsError(
                f"logit_bias names token {biased[0]}, outside {self.target.name}'s vocabulary "
                f"(0 to {self.vocab_size - 1})"
            )
        if seed is None:
            seed = secrets.randbits(63)
        sampler = make_sampler(request, seed, len(prompt_ids))
        if grammar is not None:
            sampler.constraint = self.grammar_compiler().constraint(
                grammar, sorted(request.eos_token_ids), len(prompt_ids)
            )
        runner = self._for_call(call.drafting)
        try:
            yield from runner._decode(
                prompt_ids, request, sampler, seed, should_stop, top_logprobs, top_prompt
            )
        except (Exception, KeyboardInterrupt):
            # a pass that failed midway may have written some layers' caches and not others
            self._caches_suspect = runner._caches_suspect = True
            raise

    def grammar_compiler(self) -> GrammarCompiler:
        """Compiles grammars against the target's tokenizer (reads the vocabulary once)."""
        if self._grammars is None:
            self._grammars = GrammarCompiler(self.target.tokenizer, self.vocab_size)
        return self._grammars

    def _check_logprobs(self, logprobs: Any, name: str = "logprobs") -> int | None:
        if logprobs is None:
            return None
        if not isinstance(logprobs, int) or isinstance(logprobs, bool) or logprobs < 0:
            raise InvalidSettingsError(
                f"{name} must be a whole number of alternatives to give per token (0: the "
                f"chosen token's log-probability alone), got {logprobs!r}"
            )
        if logprobs > self.vocab_size:
            raise InvalidSettingsError(
                f"{name} asks for {logprobs} alternatives but the vocabulary has "
                f"{self.vocab_size} tokens"
            )
        return logprobs

    def _for_call(self, drafting: DraftingOverrides) -> SpeculativeGenerator:
        """This generator, or a shallow copy (same target session) drafting as the call asks."""
        if drafting.empty:
            return self
        runner = copy.copy(self)
        runner.drafter, runner.schedule = drafting.apply(self.drafter, self.schedule)
        runner.drafter.bind(runner.session)
        return runner

    # ----------------------------------------------------------------------------- the loop
    def _decode(
        self,
        prompt_ids: list[int],
        request: GenerationRequest,
        sampler: TokenSampler,
        seed: int,
        should_stop: Callable[[], bool] | None,
        top_logprobs: int | None = None,
        top_prompt: int | None = None,
    ) -> Iterator[GenerationEvent]:
        stats = GenerationStats(prompt_tokens=len(prompt_ids))
        text = TextStream(self.target.tokenizer, request.stop_strings)
        ids = list(prompt_ids)
        new: list[int] = []
        wants_costs = self.pad_passes or self.schedule.needs_costs
        if self.drafter is not None and self.pass_costs is None and wants_costs:
            self._calibrate(ids)
        reuse = (
            self.reuse_prompt_cache
            and top_prompt is None  # scoring the prompt needs every position's logits
            and not self._caches_suspect
            and can_pad(self.session.cache)  # (a sliding-window layer cannot be cut back)
        )
        self._caches_suspect = False
        if reuse:
            feed = self.session.sync(ids)  # keeps the positions shared with the last sequence
        else:
            self.session.reset()
            feed = ids
        stats.cached_prompt_tokens = len(ids) - len(feed)
        self.schedule.reset()
        positions = len(ids) + request.max_new_tokens + PASS_SLACK
        self.session.reserve(positions)
        if self.drafter is not None:
            begin_sequence(self.drafter, ids, reuse_cache=stats.cached_prompt_tokens > 0)
            self.drafter.reserve(positions)
        start = time.perf_counter()

        # Prefill: the prompt in one pass gives the first token.
        prompt_lps: tuple[TokenLogprob, ...] | None = None
        if top_prompt is None:
            logits = self.session.forward(feed, 1)
        else:  # every position's logits: each prompt token's log-probability too
            prompt_lps, logits = self._scored_prefill(ids, top_prompt)
        first = sampler.choose(sampler.scores(logits, ids, len(ids))[0])
        round_logprobs = self._logprobs(logits, [first.token], top_logprobs)
        synchronize(self.session.device)
        stats.target_passes = 1
        stats.target_seconds = stats.time_to_first_token = time.perf_counter() - start
        proposal, verdict, draft = [first.token], Verdict(0, first.token, 0), EMPTY_DRAFT
        target_seconds = stats.target_seconds

        run_ahead = (
            self.drafter is None
            and self.tokens_per_sync > 1
            and sampler.plain_argmax
            and top_logprobs is None  # the logprobs need each step's logits on the host
        )
        ahead: list[int] = []  # tokens chosen on the device, not yet given out
        all_logprobs: list[TokenLogprob] | None = None if top_logprobs is None else []
        finish: FinishReason | None = None
        while True:
            event, finish = self._accept(
                proposal, verdict, draft, target_seconds, new, text, request, round_logprobs
            )
            if prompt_lps is not None and stats.rounds == 0:  # the prefill's event
                event = dataclasses.replace(event, prompt_logprobs=prompt_lps)
            if all_logprobs is not None and event.logprobs is not None:
                all_logprobs.extend(event.logprobs)
            ids.extend(event.token_ids)
            stats.new_tokens = len(new)
            yield event
            if finish is None and should_stop is not None and should_stop():
                finish = "cancelled"
            if finish is not None:
                break
            if run_ahead:  # plain greedy decoding, tokens chosen on the device
                if not ahead:
                    tick = time.perf_counter()
                    ahead = self._greedy_run(ids, request.max_new_tokens - len(new))
                    target_seconds = (time.perf_counter() - tick) / len(ahead)
                draft, verdict = EMPTY_DRAFT, Verdict(0, ahead.pop(0), 0)
                stats.record_round(0, 0)
                stats.target_seconds += target_seconds
                proposal = [verdict.next_token]
                continue
            draft = self._draft(ids, request.max_new_tokens - len(new), sampler)
            tick = time.perf_counter()
            verdict, logits = self._verify(ids, draft, sampler)
            synchronize(self.session.device)
            target_seconds = time.perf_counter() - tick
            proposal = [*draft.tokens[: verdict.num_accepted], verdict.next_token]
            # after the pass's timing, which the draft-length schedule learns costs from
            round_logprobs = self._logprobs(logits, proposal, top_logprobs)
            stats.record_round(len(draft), verdict.num_accepted, draft.free)
            self.schedule.observe_time(
                len(draft), draft.seconds, self.last_pass_size, target_seconds, free=draft.free
            )
            stats.draft_seconds += draft.seconds
            stats.draft_prefill_seconds += draft.prefill_seconds
            stats.target_seconds += target_seconds

        stats.total_seconds = time.perf_counter() - start
        tail = text.flush()
        result = GenerationResult(
            text=text.text,
            token_ids=new,
            prompt_ids=prompt_ids,
            finish_reason=finish,
            stats=stats,
            seed=seed if sampler.settings.do_sample else None,
            settings=_settings(request, sampler),
            logprobs=None if all_logprobs is None else tuple(all_logprobs),
            prompt_logprobs=prompt_lps,
        )
        yield FinishEvent(result=result, text=tail)

    def _scored_prefill(
        self, ids: list[int], top: int
    ) -> tuple[tuple[TokenLogprob, ...], torch.Tensor]:
        """The prefill with the output head at every position, ``PROMPT_CHUNK`` positions a
        pass (so that a long prompt never holds its whole length x vocabulary of logits):
        each prompt token's log-probability after the first, and the last position's logits."""
        scored: list[TokenLogprob] = []
        logits = torch.empty(0)
        for begin in range(0, len(ids), PROMPT_CHUNK):
            chunk = ids[begin : begin + PROMPT_CHUNK]
            rows = self.session.forward(chunk, len(chunk))
            scored += token_logprobs(rows, ids[begin + 1 : begin + 1 + len(chunk)], top)
            logits = rows[-1:]
        return tuple(scored), logits

    @staticmethod
    def _logprobs(
        logits: torch.Tensor, tokens: list[int], top: int | None
    ) -> list[TokenLogprob] | None:
        """The round's tokens' log-probabilities (row i of ``logits`` chose ``tokens[i]``)."""
        return None if top is None else token_logprobs(logits, tokens, top)

    def _draft(self, ids: list[int], remaining: int, sampler: TokenSampler) -> Draft:
        """Ask the drafter for at most k tokens, never more than the budget minus the target's.

        A free draft (a hybrid's prompt lookup) is offered first and verified instead when the
        schedule takes it; then the schedule is not asked for k this round."""
        if self.drafter is None or remaining < 2:
            return EMPTY_DRAFT
        free = self.drafter.free_draft(ids, remaining - 1)
        taken = 0 if free is None else min(self.schedule.free_length(free), remaining - 1)
        if free is not None and taken > 0:
            usable = self._usable(free, taken, ids, sampler)
            if len(usable):  # else (an id the target lacks first) the model drafts
                return usable
        k = min(self.schedule.next(), remaining - 1)
        if k < 1:
            return EMPTY_DRAFT
        draft = self.drafter.propose(ids, k, sampler, self.schedule.stop_rule())
        return self._usable(draft, k, ids, sampler)

    def _greedy_run(self, ids: list[int], remaining: int) -> list[int]:
        """Plain greedy decoding's next tokens (at most ``tokens_per_sync`` and ``remaining``),
        chosen on the device and read back at once; the last of them is not fed yet."""
        logits = self.session.forward(ids[self.session.length :], 1)[-1]
        steps = min(self.tokens_per_sync, remaining)
        return self.session.greedy_extend(logits, steps).tokens

    def _usable(self, draft: Draft, limit: int, ids: list[int], sampler: TokenSampler) -> Draft:
        """At most ``limit`` tokens of ``draft``, ending before the first id the target's
        embedding lacks (a draft with a larger padded matrix: p = 0 there, and the target
        cannot be fed it) and before the first a grammar refuses (p = 0 there too)."""
        usable = next((i for i, t in enumerate(draft.tokens) if t >= self.vocab_size), len(draft))
        usable = min(usable, limit)
        if sampler.constraint is not None and usable:
            usable = sampler.constraint.valid_prefix(ids, draft.tokens[:usable])
        return draft.head(usable)

    def _verify(
        self, ids: list[int], draft: Draft, sampler: TokenSampler
    ) -> tuple[Verdict, torch.Tensor]:
        """One target pass over the pending token and the draft; roll back what is rejected.
        Returns the verdict and the pass's logits (k + 1, V) of the real positions.

        The pass may be padded with filler (copies of the last token) up to a cheaper size: the
        filler comes after every real position, so causal attention keeps it from changing
        their logits; it is rolled back with the rejected drafts.
        """
        k = len(draft)
        pending = len(ids) - self.session.length
        feed = ids[self.session.length :] + draft.tokens
        size = self._pass_size(len(feed)) if k else len(feed)
        feed += feed[-1:] * (size - len(feed))
        self.last_pass_size = size
        logits = self.session.forward(feed, size - pending + 1)[: k + 1]  # (k + 1, V)
        scores = sampler.scores(logits, ids + draft.tokens, len(ids))
        if sampler.greedy:  # the draft's ids as the host has them: one read back, the target's
            verdict = greedy_verify(draft.tokens, greedy(scores))
        else:
            tokens = torch.tensor(draft.tokens, dtype=torch.long, device=scores.device)
            if isinstance(sampler, SeededSampler):
                verdict = seeded_verify(tokens, scores, sampler.seed, sampler.position(len(ids)))
            else:
                verdict = speculative_sample(tokens, draft.q, to_probs(scores), sampler.generator)
        self.session.truncate(len(ids) + verdict.num_accepted)
        if draft.free:
            self.schedule.update_free(draft, verdict)
            return verdict, logits
        self.schedule.update(verdict, draft.confidence)
        if self.drafter is not None:
            self.drafter.observe(verdict)
        return verdict, logits

    def _calibrate(self, context: list[int]) -> None:
        """Measure the target's pass costs once per generator, at the first prompt's length
        (about 40 target steps). Only where passes can be rolled back exactly (see
        :func:`can_pad`); elsewhere the policy keeps its initial k and nothing is padded."""
        self.session.reset()
        if can_pad(self.session.cache):
            self.pass_costs = pass_costs_for(self.target, self.session, context)
            self.schedule.use_costs(self.pass_costs, self.pad_passes)

    def _pass_size(self, n: int) -> int:
        """The cheapest pass size holding ``n`` tokens that fits the context (n: no padding)."""
        if not self.pad_passes or self.pass_costs is None or not can_pad(self.session.cache):
            return n
        limit = self.target.max_context
        room = None if limit is None else limit - self.session.length
        return self.pass_costs.padded_size(n, room)

    def _accept(
        self,
        proposal: list[int],
        verdict: Verdict,
        draft: Draft,
        target_seconds: float,
        new: list[int],
        text: TextStream,
        request: GenerationRequest,
        logprobs: list[TokenLogprob] | None = None,
    ) -> tuple[RoundEvent, FinishReason | None]:
        """Apply the stops to a round's tokens, append them to ``new``, build the event."""
        finish: FinishReason | None = None
        tokens = list(proposal)
        eos_at = next((i for i, t in enumerate(tokens) if t in request.eos_token_ids), None)
        if eos_at is not None:
            tokens, finish = tokens[: eos_at + 1], "eos"
        room = request.max_new_tokens - len(new)
        if len(tokens) > room:
            tokens, finish = tokens[:room], None
        if finish is None and len(tokens) == room:
            finish = "length"
        update = text.push(tokens)
        if update.keep_tokens is not None:
            tokens, finish = tokens[: update.keep_tokens], "stop_string"
        new.extend(tokens)
        from_draft = [i < verdict.num_accepted for i in range(len(tokens))]
        event = RoundEvent(
            token_ids=tokens,
            from_draft=from_draft,
            text=update.text,
            num_drafted=verdict.num_drafted,
            num_accepted=verdict.num_accepted,
            draft_seconds=draft.seconds,
            target_seconds=target_seconds,
            copied=draft.ngram > 0,  # prompt lookup's draft (alone or in front of a model)
            logprobs=None if logprobs is None else tuple(logprobs[: len(tokens)]),
        )
        return event, finish


def make_sampler(request: GenerationRequest, seed: int, prompt_length: int) -> TokenSampler:
    """The sampler for ``request``: seeded (counter-based noise) when sampling in seeded mode,
    otherwise one drawing from a ``torch.Generator`` seeded with ``seed``."""
    generator = torch.Generator(device="cpu").manual_seed(seed % 2**64)  # any int is a seed
    if request.sampling.do_sample and request.sampling_mode == "seeded":
        return SeededSampler(request.sampling, generator, seed=seed, prompt_length=prompt_length)
    return TokenSampler(request.sampling, generator, prompt_length)


def _settings(request: GenerationRequest, sampler: TokenSampler) -> dict[str, Any]:
    """The resolved settings a result records, with the grammar when one constrained it."""
    settings = request.describe()
    grammar = getattr(sampler.constraint, "grammar", None)
    if grammar is not None:
        settings["grammar"] = grammar.describe()
    return settings


def _as_id_list(encoded: Any) -> list[int]:
    if isinstance(encoded, dict) or hasattr(encoded, "keys"):
        encoded = encoded["input_ids"]
    if isinstance(encoded, torch.Tensor):
        encoded = encoded.tolist()
    if encoded and isinstance(encoded[0], list):
        encoded = encoded[0]
    return [int(i) for i in encoded]
