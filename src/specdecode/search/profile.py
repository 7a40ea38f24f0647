"""Skip profiles: a layer-skip draft setting a user keeps and shares, as JSON.

A profile names the model it was made for (name, layer count, a hash of its config), the
attention and MLP sublayers to skip, the draft settings, and what was measured with it. Using it
on another model is a :class:`~specdecode.errors.ProfileMismatchError`. Example::

    {
      "format": "specdecode-skip-profile", "version": 1,
      "model": {"name": "smollm2-135m", "model_type": "llama", "num_layers": 30,
                "config_hash": "3f2a..."},
      "skip": {"attention": [16, 18, 20], "mlp": [17, 21]},
      "draft": {"max_draft_tokens": 8, "threshold": 0.8, "adaptive": true, ...},
      "measured": {"alpha": 0.71, "tau": 2.1, "c": 0.62, "speedup": 0.93, ...}
    }
"""

from __future__ import annotations

import json
import platform
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from specdecode.drafters.layerskip import DraftExit, LayerSkipDrafter
from specdecode.errors import ProfileMismatchError, SkipProfileError
from specdecode.models import LoadedModel
from specdecode.models.layerskip import SkipSet
from specdecode.models.machine import cpu_name

FORMAT = "specdecode-skip-profile"
VERSION = 1


@dataclass(frozen=True)
class ModelIdentity:
    """Which model a profile is for."""

    name: str  # what the user passed when searching (a name, a folder, a file)
    model_type: str  # config.model_type
    num_layers: int
    config_hash: str  # LoadedModel.config_hash(): the architecture-defining config

    @classmethod
    def of(cls, model: LoadedModel) -> ModelIdentity:
        model_type = str(getattr(model.config, "model_type", "unknown"))
        return cls(model.name, model_type, model.num_layers, model.config_hash())


@dataclass(frozen=True)
class DraftSettings:
    """How the layer-skipped model drafts (see :class:`specdecode.drafters.layerskip.DraftExit`)."""

    max_draft_tokens: int = 8  # k: the most tokens drafted per round (generate's -k)
    threshold: float | None = 0.8  # draft exit: stop below this top probability; None: fixed k
    adaptive: bool = True  # adapt the threshold to hold the acceptance rate near the target
    target_acceptance: float = 0.9

    def exit(self) -> DraftExit:
        return DraftExit(
            threshold=self.threshold,
            adaptive=self.adaptive,
            target_acceptance=self.target_acceptance,
        )


@dataclass(frozen=True)
class Measurement:
    """What was measured with a profile, and where."""

    alpha: float | None  # acceptance rate (accepted / (accepted + rejected rounds))
    tau: float  # new tokens per target forward pass
    c: float | None  # cost of a draft step relative to a full target step (timed)
    speedup: float | None  # tokens/s over plain decoding on the same prompts
    tokens_per_second: float
    baseline_tokens_per_second: float | None
    modelled_speedup: float | None  # the search's cost model (see specdecode.search.cost)
    objective: str  # what the search maximised
    prompts: int  # how many prompts were measured
    max_new_tokens: int
    machine: str = field(default_factory=lambda: machine_description())
    dtype: str = ""
    threads: int = field(default_factory=torch.get_num_threads)
    versions: dict[str, str] = field(default_factory=lambda: library_versions())
    measured_at: str = field(
        default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds")
    )


@dataclass(frozen=True)
class SkipProfile:
    """A skip set for one model, with its draft settings and measurements."""

    model: ModelIdentity
    attention: tuple[int, ...]
    mlp: tuple[int, ...]
    draft: DraftSettings = DraftSettings()
    measured: Measurement | None = None

    @property
    def skip(self) -> SkipSet:
        return SkipSet.of(self.attention, self.mlp)

    def check_model(self, model: LoadedModel) -> None:
        """Raise :class:`ProfileMismatchError` unless ``model`` is the model this profile is for."""
        mine = self.model
        if model.num_layers != mine.num_layers or model.config_hash() != mine.config_hash:
            raise ProfileMismatchError(
                f"this skip profile was made for {mine.name} ({mine.model_type}, "
                f"{mine.num_layers} layers, config {mine.config_hash}), not for {model.name} "
                f"({model.num_layers} layers, config {model.config_hash()}): run `specdecode "
                f"search --target {model.name}` to make one for it"
            )

    def drafter(self, model: LoadedModel) -> LayerSkipDrafter:
        """The layer-skip drafter this profile describes, for ``model`` (checked first)."""
        self.check_model(model)
        return LayerSkipDrafter(model, self.skip, self.draft.exit())

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "model": asdict(self.model),
            "skip": {"attention": list(self.attention), "mlp": list(self.mlp)},
            "draft": asdict(self.draft),
            "measured": None if self.measured is None else asdict(self.measured),
        }

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "the profile") -> SkipProfile:
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise SkipProfileError(
                f"{where} is not a specdecode skip profile (no format: {FORMAT})"
            )
        if data.get("version") != VERSION:
            raise SkipProfileError(
                f"{where} has profile version {data.get('version')}; this specdecode reads "
                f"version {VERSION}"
            )
        try:
            skip = data["skip"]
            measured = data.get("measured")
            return cls(
                model=ModelIdentity(**data["model"]),
                attention=tuple(int(i) for i in skip["attention"]),
                mlp=tuple(int(i) for i in skip["mlp"]),
                draft=DraftSettings(**data.get("draft", {})),
                measured=None if measured is None else Measurement(**measured),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise SkipProfileError(f"{where} is malformed ({type(exc).__name__}: {exc})") from exc


def load_profile(path: str | Path) -> SkipProfile:
    """Read a skip profile; :class:`SkipProfileError` when it is missing or not one."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise SkipProfileError(
            f"cannot read the skip profile {path}: {exc.strerror or exc}"
        ) from exc
    except json.JSONDecodeError as exc:
        raise SkipProfileError(f"{path} is not JSON ({exc.msg}, line {exc.lineno})") from exc
    return SkipProfile.from_dict(data, str(path))


def drafter_from_profile(path: str | Path, model: LoadedModel) -> LayerSkipDrafter:
    """The layer-skip drafter of the profile in ``path``, for ``model`` (checked to match)."""
    return load_profile(path).drafter(model)


def machine_description() -> str:
    """CPU (or GPU) model and core count, for the record."""
    cpu = cpu_name()
    text = f"{cpu}, {_cpu_count()} cores, {platform.system()} {platform.release()}"
    if torch.cuda.is_available():
        text += f"; GPU {torch.cuda.get_device_name(0)}"
    return text


def library_versions() -> dict[str, str]:
    import transformers

    from specdecode import __version__

    versions = {
        "specdecode": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }
    try:
        import optuna

        versions["optuna"] = optuna.__version__
    except ImportError:
        pass
    return versions


def _cpu_count() -> int:
    import os

    sched = getattr(os, "sched_getaffinity", None)
    return len(sched(0)) if sched is not None else (os.cpu_count() or 1)
