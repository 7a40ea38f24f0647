"""Typed errors. Every message says what went wrong and what the user can do about it."""


class SpecDecodeError(Exception):
    """Base class of the errors specdecode raises on purpose (the CLI prints them, no traceback)."""


class InvalidSettingsError(SpecDecodeError, ValueError):
    """A generation or sampling argument is out of range or contradicts another."""


class ModelLoadError(SpecDecodeError):
    """A model or tokenizer could not be loaded from the path, file or name given."""


class VocabularyMismatchError(SpecDecodeError):
    """The draft model's tokenizer does not match the target's: its tokens mean something else."""


class PromptError(SpecDecodeError, ValueError):
    """The prompt is empty or does not fit in the model's context."""


class UnsupportedModelError(SpecDecodeError):
    """The model's architecture does not support a requested feature (e.g. layer skipping)."""


class UnknownModelError(SpecDecodeError, ValueError):
    """A model name is not one of the known models of `specdecode models list`."""


class ModelNotPulledError(ModelLoadError):
    """A known model has not been pulled into the local cache yet."""


class ModelPullError(ModelLoadError):
    """A known model could not be pulled: downloaded, checked or converted."""


class RegistryUnreachableError(ModelPullError):
    """The package registry holding a model's files cannot be reached."""


class ChecksumMismatchError(ModelPullError):
    """An assembled model file's size or sha256 differs from the pinned one."""


class SkipProfileError(SpecDecodeError, ValueError):
    """A skip profile file is missing, unreadable or not a skip profile."""


class ProfileMismatchError(SkipProfileError):
    """A skip profile was made for another model (other layer count or config)."""


class SearchError(SpecDecodeError):
    """A skip-set search cannot start or continue (storage, study settings, missing extras)."""


class GrammarError(InvalidSettingsError):
    """A grammar for constrained output (JSON schema, regex, Lark, choices) is not usable."""
