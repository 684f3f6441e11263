"""Weight helpers: cache folders resolved at call time, HF cache lookup, offline errors, cached hashing."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from atlaspatch_stream.backends import weights
from atlaspatch_stream.errors import WeightsError
from atlaspatch_stream.testing.sam2_weights import install_in_hf_cache


def test_hf_cache_dir_follows_the_environment_now(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Change HF_HUB_CACHE, then HF_HOME, then neither: each call reflects the environment of that moment."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "a"))
    assert weights.hf_cache_dir() == tmp_path / "a"
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert weights.hf_cache_dir() == tmp_path / "home" / "hub"
    monkeypatch.delenv("HF_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert weights.hf_cache_dir() == tmp_path / "xdg" / "huggingface" / "hub"


def test_find_and_fetch_from_an_offline_cache(tmp_path: Path) -> None:
    """Lay a file out as the HF cache does, offline: find_hf_file and fetch_hf_file both return it."""
    source = tmp_path / "weights.bin"
    source.write_bytes(b"not really a model" * 100)
    assert weights.find_hf_file("some-org/some-model", "model.pth") is None
    installed = install_in_hf_cache(source, weights.hf_cache_dir(), repo_id="some-org/some-model")
    found = weights.find_hf_file("some-org/some-model", "model.pth")
    assert found is not None and found == installed
    assert found.read_bytes() == source.read_bytes()
    assert weights.fetch_hf_file("some-org/some-model", "model.pth") == found
    assert weights.find_hf_file("some-org/some-model", "other.pth") is None


def test_fetch_offline_without_the_file_names_file_folder_and_remedies() -> None:
    """Offline with an empty cache: WeightsError naming the file, repo, cache folder, going online and the local flag."""
    with pytest.raises(WeightsError) as info:
        weights.fetch_hf_file("some-org/some-model", "model.pth", local_flag="--my-weights")
    text = str(info.value)
    for part in (
        "model.pth",
        "some-org/some-model",
        str(weights.hf_cache_dir()),
        "network",
        "--my-weights PATH",
    ):
        assert part in text
    assert "\n" not in text


def test_sha256_is_correct_and_follows_file_changes(tmp_path: Path) -> None:
    """Hash a file, hash it again, rewrite it with other content: the digest always equals hashlib's of the bytes."""
    path = tmp_path / "blob"
    path.write_bytes(b"a" * 10_000)
    first = weights.sha256_file(path)
    assert first == hashlib.sha256(b"a" * 10_000).hexdigest()
    assert weights.sha256_file(path) == first
    path.write_bytes(b"b" * 10_001)
    assert weights.sha256_file(path) == hashlib.sha256(b"b" * 10_001).hexdigest()


def test_sha256_is_cached_by_path_size_and_mtime(tmp_path: Path) -> None:
    """Overwrite a file with same-size bytes but restore its mtime: the cached digest is kept (no re-read)."""
    path = tmp_path / "blob"
    path.write_bytes(b"x" * 4096)
    stat = path.stat()
    first = weights.sha256_file(path)
    path.write_bytes(b"y" * 4096)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert weights.sha256_file(path) == first


def test_torch_hub_checkpoint_uses_torch_home_at_call_time(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """TORCH_HOME set, then unset with XDG_CACHE_HOME: the checkpoint path follows."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "t"))
    assert weights.torch_hub_checkpoint("w.pth") == tmp_path / "t" / "hub" / "checkpoints" / "w.pth"
    monkeypatch.delenv("TORCH_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert weights.torch_hub_checkpoint("w.pth") == tmp_path / "x" / "torch" / "hub" / "checkpoints" / "w.pth"


def test_hf_offline_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """HF_HUB_OFFLINE=1 means offline; unset (and TRANSFORMERS_OFFLINE unset) means online."""
    assert weights.hf_offline()
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    assert not weights.hf_offline()
