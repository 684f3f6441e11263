"""Where model weights come from: the Hugging Face cache, a download when online, the torch hub folder.

Every folder is resolved from the environment *at call time*: huggingface_hub reads its cache constants once at import,
so a process (or a test) that changes `HF_HOME` / `HF_HUB_CACHE` / `HF_HUB_OFFLINE` / `TORCH_HOME` afterwards would
otherwise be ignored. We therefore always pass `cache_dir=` explicitly.

Hashing a checkpoint costs about a second per 150 MB, so `sha256_file` remembers each file by (path, size, mtime).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

from ..errors import WeightsError

_TRUE = {"1", "true", "yes", "on"}
_HASH_CHUNK = 8 * 1024 * 1024
_hash_cache: dict[tuple[str, int, int], str] = {}
_hash_lock = threading.Lock()
log = logging.getLogger(__name__)


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


def repo_folder(repo_id: str) -> str:
    """The cache folder name of a model repo, as huggingface_hub spells it: `models--ORG--NAME`."""
    return "--".join(["models", *repo_id.split("/")])


def find_hf_file(repo_id: str, *filenames: str) -> Path | None:
    """The cached copy of the first of `filenames` in the model repo `repo_id`, or None. Never touches the network.

    The folder of `repo_id` as spelled is searched first, then every cache folder whose name differs from it only in
    letter case: the hub resolves repo ids case-insensitively but the cache keeps each tool's spelling, so another
    tool may have cached the same weights as `MahmoodLab/UNI` where upstream asks for `MahmoodLab/uni`. A debug line
    names the folder used. A sharded checkpoint (`*.index.json`) counts only with all its shards beside it.

    Args:
        repo_id: e.g. "AtlasAnalyticsLab/AtlasPatch".
        filenames: paths inside the repo, in order of preference, e.g. "model.safetensors", "pytorch_model.bin".

    Returns:
        The file in the snapshot that `refs/main` points to, or None when none of them is cached.
    """
    cache = hf_cache_dir()
    for spelling in _cache_spellings(cache, repo_id):
        for filename in filenames:
            found = _cached_file(cache, spelling, filename)
            if found is not None:
                _log_hit(cache, repo_id, spelling, found)
                return found
    return None


def _cache_spellings(cache: Path, repo_id: str) -> Iterator[str]:
    """`repo_id`, then the repo ids of the other cache folders equal to its folder up to letter case (sorted)."""
    yield repo_id
    exact = repo_folder(repo_id)
    try:
        names = sorted(entry.name for entry in os.scandir(cache) if entry.is_dir())
    except OSError:  # no cache folder yet
        return
    for name in names:
        if name != exact and name.lower() == exact.lower():
            # Repo ids cannot contain "--" (huggingface_hub refuses them), so the folder name maps back uniquely.
            yield "/".join(name.split("--")[1:])


def _cached_file(cache: Path, repo_id: str, filename: str) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, filename, cache_dir=str(cache))
    # A non-str answer is either None or the "known to be absent" sentinel: both mean "not here".
    if not isinstance(found, str) or not Path(found).is_file():
        return None
    path = Path(found)
    missing = missing_shards(path)
    if missing:
        log.debug("sharded weights %s lack shards %s; not used", path, ", ".join(missing))
        return None
    return path


def missing_shards(path: Path) -> list[str]:
    """The shard files a sharded checkpoint index (`*.index.json`) names that are not beside it; [] otherwise."""
    if not path.name.endswith(".index.json"):
        return []
    try:
        shards = set(json.loads(path.read_text())["weight_map"].values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return []  # an unreadable index is reported, with the file named, when it is read
    return sorted(s for s in shards if not (path.parent / s).is_file())


def _log_hit(cache: Path, repo_id: str, spelling: str, found: Path) -> None:
    folder = cache / repo_folder(spelling)
    other = "" if spelling == repo_id else f" (repo id {spelling}, which differs only in letter case)"
    log.debug("weights %s of %s: found in the Hugging Face cache folder %s%s", found.name, repo_id, folder, other)


def missing_weights_message(repo_id: str, filenames: Sequence[str], local_flag: str | None = None) -> str:
    """One line naming the files looked up, the repo, the cache folder searched and the ways to supply them.

    Args:
        repo_id: the repo as looked up.
        filenames: the file names as looked up.
        local_flag: the command-line spelling that supplies a local copy, e.g. "--weights uni_v1=PATH".
    """
    ways = "run once with network access so it is downloaded into that cache"
    if local_flag:
        ways += f", or pass a local copy with {local_flag}"
    folder = hf_cache_dir() / repo_folder(repo_id)
    return (
        f"weights {' or '.join(filenames)} from Hugging Face repo {repo_id} not found in the cache folder {folder} "
        f"(letter case ignored); {ways}"
    )


def fetch_hf_file(repo_id: str, *filenames: str, local_flag: str | None = None) -> Path:
    """The cached file, else a download into the cache when online, else WeightsError.

    Downloads ask for `repo_id` exactly as given, so the file lands in the folder that tool (e.g. upstream) uses,
    trying `filenames` in order and moving on only when the repo has no file of that name, as hub loaders do.

    Args:
        repo_id: the model repo.
        filenames: the file names inside it, in order of preference.
        local_flag: the command-line spelling that supplies a local copy instead, named in the error message.

    Returns:
        The local path of the file.

    Raises:
        WeightsError: offline (or the download failed) and the file is not cached.
    """
    cached = find_hf_file(repo_id, *filenames)
    if cached is not None:
        return cached
    message = missing_weights_message(repo_id, filenames, local_flag)
    if hf_offline():
        raise WeightsError(f"{message} (HF_HUB_OFFLINE is set)")
    return _download(repo_id, filenames, message)


def _download(repo_id: str, filenames: Sequence[str], message: str) -> Path:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import EntryNotFoundError, LocalEntryNotFoundError

    for filename in filenames:
        try:
            path = Path(hf_hub_download(repo_id=repo_id, filename=filename, cache_dir=str(hf_cache_dir())))
        except EntryNotFoundError as exc:
            if not isinstance(exc, LocalEntryNotFoundError):
                continue  # the repo has no file of that name: try the next, as hub loaders do
            raise WeightsError(_failed(message, exc)) from exc  # no connection
        except Exception as exc:  # network, auth, gate, missing repo: all mean "no weights" to the user
            raise WeightsError(_failed(message, exc)) from exc
        return _download_shards(repo_id, path, message)
    raise WeightsError(f"{message} (the repo holds none of these files)")


def _download_shards(repo_id: str, index: Path, message: str) -> Path:
    """Fetch the shards a downloaded `*.index.json` names into the same snapshot (its folder is the commit)."""
    from huggingface_hub import hf_hub_download

    for shard in missing_shards(index):
        try:
            hf_hub_download(repo_id=repo_id, filename=shard, revision=index.parent.name, cache_dir=str(hf_cache_dir()))
        except Exception as exc:  # as above: any failure means the weights are not to be had
            raise WeightsError(_failed(message, exc)) from exc
    return index


def _failed(message: str, exc: BaseException) -> str:
    return f"{message} (download failed: {type(exc).__name__}: {' '.join(str(exc).split())})"


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


def torch_hub_dir() -> Path:
    """`torch.hub.get_dir()` resolved now: `$TORCH_HOME/hub`, default `~/.cache/torch/hub`; may not exist."""
    home = os.environ.get("TORCH_HOME")
    root = Path(home).expanduser() if home else _home_cache() / "torch"
    return root / "hub"


def torch_hub_checkpoint(filename: str) -> Path:
    """`$TORCH_HOME/hub/checkpoints/<filename>` (torchvision's cache), resolved now; may not exist."""
    return torch_hub_dir() / "checkpoints" / filename
