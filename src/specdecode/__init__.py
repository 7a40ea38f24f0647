"""specdecode: lossless speculative decoding for HuggingFace causal language models.

Quick start::

    from specdecode import load_model, SpeculativeGenerator, ModelDrafter

    target = load_model("path/to/target")
    drafter = ModelDrafter(load_model("path/to/draft"))
    gen = SpeculativeGenerator(target, drafter, draft_length=5)
    print(gen.generate("def fib(n):", max_new_tokens=64).text)
"""

from specdecode.constraints import Grammar
from specdecode.decoding import (
    FinishEvent,
    GenerationResult,
    GenerationStats,
    RoundEvent,
    SpeculativeGenerator,
)
from specdecode.drafters import (
    CostAwareLength,
    Draft,
    Drafter,
    FixedLength,
    HeuristicLength,
    LookupDrafter,
    ModelDrafter,
    PromptLookupDrafter,
)
from specdecode.errors import (
    GrammarError,
    InvalidSettingsError,
    ModelLoadError,
    PromptError,
    SpecDecodeError,
    VocabularyMismatchError,
)
from specdecode.integrations import skip_assistant
from specdecode.models import LoadedModel, check_same_vocabulary, draft_dtype_for, load_model
from specdecode.sampling import SamplingSettings

__version__ = "0.1.0"

__all__ = [
    "CostAwareLength",
    "Draft",
    "Drafter",
    "FinishEvent",
    "FixedLength",
    "GenerationResult",
    "GenerationStats",
    "Grammar",
    "GrammarError",
    "HeuristicLength",
    "InvalidSettingsError",
    "LoadedModel",
    "LookupDrafter",
    "ModelDrafter",
    "ModelLoadError",
    "PromptError",
    "PromptLookupDrafter",
    "RoundEvent",
    "SamplingSettings",
    "SpecDecodeError",
    "SpeculativeGenerator",
    "VocabularyMismatchError",
    "__version__",
    "check_same_vocabulary",
    "draft_dtype_for",
    "load_model",
    "skip_assistant",
]
