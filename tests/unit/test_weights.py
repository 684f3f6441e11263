"""Weight helpers: cache folders resolved at call time, HF cache lookup, offline errors, cached hashing."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
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
    """Offline with an empty cache: one line naming every file looked up, the repo as spelled, its cache folder,
    going online and the local flag."""
    with pytest.raises(WeightsError) as info:
        weights.fetch_hf_file(
            "Some-Org/some-model", "model.safetensors", "pytorch_model.bin", local_flag="--my-weights PATH"
        )
    text = str(info.value)
    for part in (
        "model.safetensors or pytorch_model.bin",
        "Some-Org/some-model",
        str(weights.hf_cache_dir() / "models--Some-Org--some-model"),
        "letter case",
        "network",
        "--my-weights PATH",
    ):
        assert part in text, part
    assert "\n" not in text


def _blob(tmp_path: Path, name: str, payload: bytes) -> Path:
    path = tmp_path / "sources" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(payload)
    return path


def test_a_folder_differing_only_in_letter_case_is_found_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Cache a file under `MahmoodLab/UNI` (another tool's spelling), look it up as `MahmoodLab/uni` (upstream's):
    it is found, offline, and a debug line names the folder used and the case difference."""
    source = _blob(tmp_path, "w.bin", b"uni weights")
    installed = install_in_hf_cache(source, weights.hf_cache_dir(), "MahmoodLab/UNI", "pytorch_model.bin")
    with caplog.at_level(logging.DEBUG, logger="atlaspatch_stream.backends.weights"):
        found = weights.fetch_hf_file("MahmoodLab/uni", "model.safetensors", "pytorch_model.bin")
    assert found == installed and found.read_bytes() == b"uni weights"
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert any(
        str(weights.hf_cache_dir() / "models--MahmoodLab--UNI") in line and "letter case" in line
        for line in lines
    ), lines


def test_the_exact_spelling_wins_over_a_case_variant(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Both `histai/hibou-B` and `histai/hibou-b` are cached: the lookup as `histai/hibou-B` takes that folder, and
    its debug line names it without a case note."""
    cache = weights.hf_cache_dir()
    install_in_hf_cache(_blob(tmp_path, "a", b"lower"), cache, "histai/hibou-b", "model.safetensors")
    exact = install_in_hf_cache(
        _blob(tmp_path, "b", b"upstream"), cache, "histai/hibou-B", "model.safetensors"
    )
    with caplog.at_level(logging.DEBUG, logger="atlaspatch_stream.backends.weights"):
        assert weights.find_hf_file("histai/hibou-B", "model.safetensors") == exact
    assert [r.getMessage() for r in caplog.records] == [
        f"weights model.safetensors of histai/hibou-B: found in the Hugging Face cache folder "
        f"{cache / 'models--histai--hibou-B'}"
    ]


def test_folders_that_differ_in_more_than_case_are_not_taken(tmp_path: Path) -> None:
    """A longer repo name, another org, and a dataset with the same name are all cached: none answers for the
    model repo, and a lookup with no cache folder at all simply misses."""
    cache = weights.hf_cache_dir()
    source = _blob(tmp_path, "x", b"x")
    install_in_hf_cache(source, cache, "MahmoodLab/UNI2-h", "pytorch_model.bin")
    install_in_hf_cache(source, cache, "MahmoodLab2/uni", "pytorch_model.bin")
    dataset = cache / "datasets--MahmoodLab--uni" / "snapshots" / "0" / "pytorch_model.bin"
    dataset.parent.mkdir(parents=True)
    dataset.write_bytes(b"x")
    assert weights.find_hf_file("MahmoodLab/uni", "pytorch_model.bin") is None
    shutil.rmtree(cache)
    assert weights.find_hf_file("MahmoodLab/uni", "pytorch_model.bin") is None


def test_file_names_are_tried_in_the_given_order(tmp_path: Path) -> None:
    """A repo cached with both a pickle and its safetensors twin: the first name asked for wins; with only the
    pickle cached, the pickle is found."""
    cache = weights.hf_cache_dir()
    pickle = install_in_hf_cache(_blob(tmp_path, "p", b"pickle"), cache, "org/model", "pytorch_model.bin")
    assert weights.find_hf_file("org/model", "model.safetensors", "pytorch_model.bin") == pickle
    safe = install_in_hf_cache(_blob(tmp_path, "s", b"safe"), cache, "org/model", "model.safetensors")
    assert weights.find_hf_file("org/model", "model.safetensors", "pytorch_model.bin") == safe
    assert weights.find_hf_file("org/model", "pytorch_model.bin", "model.safetensors") == pickle


def test_a_sharded_checkpoint_counts_only_with_all_its_shards(tmp_path: Path) -> None:
    """An index naming two shards is cached with one of them: not found (and named in missing_shards); once the
    second shard is in the same snapshot, the index is the file found."""
    cache = weights.hf_cache_dir()
    index = {
        "weight_map": {
            "a.weight": "model-00001-of-00002.safetensors",
            "b.weight": "model-00002-of-00002.safetensors",
        }
    }
    name = "model.safetensors.index.json"
    path = install_in_hf_cache(_blob(tmp_path, "i", json.dumps(index).encode()), cache, "facebook/big", name)
    install_in_hf_cache(
        _blob(tmp_path, "1", b"one"), cache, "facebook/big", "model-00001-of-00002.safetensors"
    )
    assert weights.missing_shards(path) == ["model-00002-of-00002.safetensors"]
    assert weights.find_hf_file("facebook/big", name) is None
    install_in_hf_cache(
        _blob(tmp_path, "2", b"two"), cache, "facebook/big", "model-00002-of-00002.safetensors"
    )
    assert weights.missing_shards(path) == []
    assert weights.find_hf_file("facebook/big", name) == path


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
    """TORCH_HOME set, then unset with XDG_CACHE_HOME: the hub folder and the checkpoint path follow, and both
    equal what torch.hub itself says."""
    import torch

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "t"))
    assert weights.torch_hub_checkpoint("w.pth") == tmp_path / "t" / "hub" / "checkpoints" / "w.pth"
    assert weights.torch_hub_dir() == Path(torch.hub.get_dir())
    monkeypatch.delenv("TORCH_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert weights.torch_hub_checkpoint("w.pth") == tmp_path / "x" / "torch" / "hub" / "checkpoints" / "w.pth"
    assert weights.torch_hub_dir() == Path(torch.hub.get_dir())


def test_hf_offline_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """HF_HUB_OFFLINE=1 means offline; unset (and TRANSFORMERS_OFFLINE unset) means online."""
    assert weights.hf_offline()
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    assert not weights.hf_offline()
