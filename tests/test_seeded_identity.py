"""Seeded sampling through the decoding loop: for a seed and sampling settings, the token ids are
the same with no drafter, with each drafter and with any draft length (float32, tiny models)."""

from __future__ import annotations

import json

import pytest

from specdecode import (
    Drafter,
    HeuristicLength,
    ModelDrafter,
    PromptLookupDrafter,
    SpeculativeGenerator,
)
from specdecode.cli.common import sampling_kwargs
from specdecode.cli.main import build_parser, main
from specdecode.sampling import SeededSampler

PROMPT = "def add(a, b):\n    return a + b\ndef add"
NEW = 16
SETTINGS = {
    "temperature": {"temperature": 1.0, "top_k": 0},
    "top_k": {"temperature": 0.7, "top_k": 20},
    "top_p": {"temperature": 1.1, "top_k": 0, "top_p": 0.9},
    "min_p": {"temperature": 1.3, "top_k": 0, "min_p": 0.05},
    "repetition_penalty": {"temperature": 0.9, "top_k": 40, "repetition_penalty": 1.3},
}
CASES = [("llama", name, (0, 1)) for name in SETTINGS] + [
    (arch, name, (3, 4)) for arch in ("qwen2", "gpt2") for name in ("temperature", "top_p", "min_p")
]


def _speculative(tiny, arch):
    """(label, drafter, draft length): coupled drafts, an unrelated draft, prompt lookup."""
    close, unrelated = tiny(arch, "perturbed"), tiny(arch, "unrelated")
    return [
        ("draft-model k=2", ModelDrafter(close), 2),
        (
            "draft-model heuristic k",
            ModelDrafter(close, confidence_threshold=0.2),
            HeuristicLength(4),
        ),
        ("unrelated draft k=3", ModelDrafter(unrelated), 3),
        ("prompt lookup k=4", PromptLookupDrafter(max_ngram=2), 4),
    ]


@pytest.mark.parametrize(("arch", "setting", "seeds"), CASES, ids=[f"{a}-{s}" for a, s, _ in CASES])
def test_same_seed_same_tokens_whatever_the_drafter(tiny, arch, setting, seeds):
    target = tiny(arch)
    cfg = SETTINGS[setting]
    plain = SpeculativeGenerator(target)
    accepted = 0
    outputs = set()
    for seed in seeds:
        want = plain.generate(PROMPT, max_new_tokens=NEW, seed=seed, **cfg)
        assert want.settings["sampling_mode"] == "seeded"
        outputs.add(tuple(want.token_ids))
        for label, drafter, k in _speculative(tiny, arch):
            got = SpeculativeGenerator(target, drafter, k).generate(
                PROMPT, max_new_tokens=NEW, seed=seed, **cfg
            )
            assert got.token_ids == want.token_ids, f"{label}, seed {seed}"
            assert got.seed == seed
            if label.startswith("draft-model"):
                accepted += got.stats.accepted
    assert accepted > 0, "the coupled draft never matched: nothing was tested beyond plain"
    assert len(outputs) == len(seeds), "different seeds gave the same text"


class _Uncoupled(Drafter):
    """The same draft model choosing with other noise (a different seed): no coupling."""

    def __init__(self, inner: Drafter) -> None:
        self.inner = inner

    def begin(self, prompt_ids):
        self.inner.begin(prompt_ids)

    def propose(self, ids, max_tokens, sampler, stop=None):
        other = SeededSampler(
            sampler.settings, None, seed=sampler.seed + 1, prompt_length=sampler.prompt_length
        )
        return self.inner.propose(ids, max_tokens, other, stop)


def test_coupling_raises_acceptance(tiny):
    """A draft choosing with the target's noise agrees with it far more often than the same
    draft choosing with other noise; the output is the same either way."""
    target, close = tiny("llama"), tiny("llama", "perturbed")
    rates, outputs = [], []
    for drafter in (ModelDrafter(close), _Uncoupled(ModelDrafter(close))):
        generator = SpeculativeGenerator(target, drafter, 3)
        accepted = rejected = 0
        tokens = []
        for seed in range(3):
            result = generator.generate(PROMPT, max_new_tokens=20, seed=seed, temperature=1.0)
            accepted, rejected = (
                accepted + result.stats.accepted,
                rejected + result.stats.rejected_rounds,
            )
            tokens.append(result.token_ids)
        rates.append(accepted / (accepted + rejected))
        outputs.append(tokens)
    assert outputs[0] == outputs[1]
    assert rates[0] > rates[1] + 0.1, rates


def test_greedy_is_untouched_by_the_mode(tiny):
    target, close = tiny("llama"), tiny("llama", "perturbed")
    generator = SpeculativeGenerator(target, ModelDrafter(close), 3)
    base = generator.generate(PROMPT, max_new_tokens=NEW)
    for mode in ("seeded", "auto"):
        result = generator.generate(PROMPT, max_new_tokens=NEW, seed=9, sampling_mode=mode)
        assert result.token_ids == base.token_ids
        assert result.seed is None and "sampling_mode" not in result.settings


def test_a_drawn_seed_reproduces_in_seeded_mode(tiny):
    """Without a seed the seeded mode draws one and reports it: passing it back gives the text."""
    target = tiny("llama")
    generator = SpeculativeGenerator(target, PromptLookupDrafter(), 3)
    first = generator.generate(PROMPT, max_new_tokens=NEW, temperature=1.0, sampling_mode="seeded")
    assert first.seed is not None and first.settings["sampling_mode"] == "seeded"
    again = SpeculativeGenerator(target).generate(
        PROMPT, max_new_tokens=NEW, temperature=1.0, seed=first.seed
    )
    assert again.token_ids == first.token_ids
    unseeded = generator.generate(PROMPT, max_new_tokens=4, temperature=1.0)
    assert unseeded.settings["sampling_mode"] == "rejection"


@pytest.mark.parametrize(
    ("flags", "mode"),
    [
        (["--seed", "3"], "seeded"),
        ([], "rejection"),
        (["--seed", "3", "--sampling-mode", "rejection"], "rejection"),
        (["--sampling-mode", "seeded"], "seeded"),
    ],
)
def test_cli_resolves_the_mode_from_the_seed(flags, mode):
    args = build_parser().parse_args(
        ["generate", "x", "--target", "t", "--temperature", "1", *flags]
    )
    assert sampling_kwargs(args)["sampling_mode"] == mode


def test_cli_samples_are_the_same_with_and_without_a_drafter(tiny_dir, capsys):
    common = ["generate", PROMPT, "--target", str(tiny_dir("llama")), "--temperature", "1.2"]
    common += ["--seed", "11", "-n", "3", "--max-new-tokens", "12", "--json", "--device", "cpu"]
    outputs = []
    for extra in ([], ["--draft", str(tiny_dir("llama", "perturbed")), "-k", "3"]):
        assert main([*common, *extra]) == 0
        outputs.append(json.loads(capsys.readouterr().out)["samples"])
    plain, drafted = outputs
    assert [s["token_ids"] for s in plain] == [s["token_ids"] for s in drafted]
    assert [s["seed"] for s in plain] == [s["seed"] for s in drafted]
    assert len({tuple(s["token_ids"]) for s in plain}) == 3  # one seed per sample
