"""Where model weights come from: the Hugging Face cache, a download when online, the torch hub folder.

Every folder is resolved from the environment *at call time*: huggingface_hub reads its cache constants once at import,
so a process (or a test) that changes `HF_HOME` / `HF_HUB_CACHE` / `HF_HUB_OFFLINE` / `TORCH_HOME` afterwards would
otherwise be ignored. We therefore always pass `cache_dir=` explicitly.

Hashing a checkpoint costs about a second per 150 MB, so `sha256_file` remembers each file by (path, size, mtime).
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

from ..errors import WeightsError

_TRUE = {"1", "true", "yes", "on"}
_HASH_CHUNK = 8 * 1024 * 1024
_hash_cache: dict[tuple[str, int, int], str] = {}
_hash_lock = threading.Lock()


def _home_cache() -> Path:
    """`$XDG_CACHE_HOME`, else `~/.cache` (the root both huggingface_hub and torch fall back to)."""
    xdg = os.environ.get("XDG_CACHE_HOME")
    return Path(xdg) if xdg else Path.home() / ".cache"


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache folder, resolved from the environment now.

    Order as in huggingface_hub: `HF_HUB_CACHE`, the legacy `HUGGINGFACE_HUB_CACHE`, `HF_HOME/hub`,
    then `$XDG_CACHE_HOME/huggingface/hub` or `~/.cache/huggingface/hub`.
    """
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        value = os.environ.get(name)
        if value:
            return Path(value).expanduser()
    home = os.environ.get("HF_HOME")
    if home:
        return Path(home).expanduser() / "hub"
    return _home_cache() / "huggingface" / "hub"


def hf_offline() -> bool:
    """Whether `HF_HUB_OFFLINE` (or the older `TRANSFORMERS_OFFLINE`) asks for no network, read now."""
    return any(
        os.environ.get(name, "").strip().lower() in _TRUE
        for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def find_hf_file(repo_id: str, filename: str) -> Path | None:
    """The cached copy of `filename` from the model repo `repo_id`, or None. Never touches the network.

    Args:
        repo_id: e.g. "AtlasAnalyticsLab/AtlasPatch".
        filename: a path inside the repo, e.g. "model.pth".

    Returns:
        The file in the snapshot that `refs/main` points to, or None when it is not cached.
    """
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, filename, cache_dir=str(hf_cache_dir()))
    # A non-str answer is either None or the "known to be absent" sentinel: both mean "not here".
    if isinstance(found, str) and Path(found).is_file():
        return Path(found)
    return None


def missing_weights_message(repo_id: str, filename: str, local_flag: str | None = None) -> str:
    """One message naming the missing file, the cache folder searched and the ways to supply it."""
    ways = "run once with network access so it is downloaded into that cache"
    if local_flag:
        ways += f", or pass a local copy with {local_flag} PATH"
    return (
        f"weights {filename} from Hugging Face repo {repo_id} not found in the cache {hf_cache_dir()}; {ways}"
    )


def fetch_hf_file(repo_id: str, filename: str, *, local_flag: str | None = None) -> Path:
    """The cached file, else a download into the cache when online, else WeightsError.

    Args:
        repo_id: the model repo.
        filename: the file inside it.
        local_flag: the command-line flag that supplies a local copy instead, named in the error message.

    Returns:
        The local path of the file.

    Raises:
        WeightsError: offline (or the download failed) and the file is not cached.
    """
    cached = find_hf_file(repo_id, filename)
    if cached is not None:
        return cached
    message = missing_weights_message(repo_id, filename, local_flag)
    if hf_offline():
        raise WeightsError(f"{message} (HF_HUB_OFFLINE is set)")
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id=repo_id, filename=filename, cache_dir=str(hf_cache_dir())))
    except Exception as exc:  # network, auth, missing repo: all mean "no weights" to the user
        raise WeightsError(f"{message} (download failed: {type(exc).__name__}: {exc})") from exc


def sha256_file(path: Path) -> str:
    """The hex sha256 of a file, computed once per (path, size, mtime).

    Args:
        path: the file.

    Returns:
        64 lowercase hex digits.
    """
    resolved = Path(path).resolve()
    stat = resolved.stat()
    key = (str(resolved), stat.st_size, stat.st_mtime_ns)
    with _hash_lock:
        known = _hash_cache.get(key)
    if known is not None:
        return known
    digest = hashlib.sha256()
    with open(resolved, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    value = digest.hexdigest()
    with _hash_lock:
        _hash_cache[key] = value
    return value


def torch_hub_checkpoint(filename: str) -> Path:
    """`$TORCH_HOME/hub/checkpoints/<filename>` (default `~/.cache/torch`), resolved now; may not exist."""
    home = os.environ.get("TORCH_HOME")
    root = Path(home).expanduser() if home else _home_cache() / "torch"
    return root / "hub" / "checkpoints" / filename
