"""Seeded random SAM2 checkpoints in the published format, and a Hugging Face cache layout that holds one.

For tests and benchmarks: random weights give arbitrary masks, which is enough to check that two code paths agree.
Importing this module is light; torch and sam2 are imported when a checkpoint is written.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

SAM2_REPO_ID = "AtlasAnalyticsLab/AtlasPatch"
SAM2_FILENAME = "model.pth"


def write_random_sam2_checkpoint(path: Path, seed: int = 0) -> Path:
    """Write `{"model": state_dict}` of a SAM2.1 Hiera-Tiny with seeded random init (about 156 MB).

    Args:
        path: the file to write (parent folders are created).
        seed: the torch seed for the initialisation; the same seed gives the same weights.

    Returns:
        `path`.
    """
    import torch

    from ..backends.segment_sam2 import build_sam2_model

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_sam2_model(None, torch.device("cpu"))
    torch.save({"model": model.state_dict()}, path)
    return path


def _link_or_copy(source: Path, target: Path) -> None:
    """Hard-link (cheap, same bytes) when the file system allows, else copy."""
    target.unlink(missing_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def install_in_hf_cache(checkpoint: Path, cache_dir: Path, repo_id: str = SAM2_REPO_ID,
                        filename: str = SAM2_FILENAME) -> Path:
    """Lay `checkpoint` out as huggingface_hub's cache would after downloading `filename` from `repo_id`.

    `<cache_dir>/models--<org>--<name>/blobs/<sha256>`, `snapshots/<commit>/<filename>` (a relative symlink to
    the blob, as huggingface_hub makes, or a copy where symlinks are unavailable) and `refs/main` = `<commit>`.
    The folder keeps `repo_id`'s letter case, as huggingface_hub does.

    Args:
        checkpoint: the file to install.
        cache_dir: the hub cache folder (what `HF_HUB_CACHE` points at).
        repo_id: the model repo to pretend it came from.
        filename: the file's path inside the repo.

    Returns:
        The path of `filename` inside the snapshot.
    """
    from ..backends.weights import repo_folder, sha256_file

    checkpoint = Path(checkpoint)
    repo_dir = Path(cache_dir) / repo_folder(repo_id)
    commit = hashlib.sha1(repo_id.encode()).hexdigest()  # files installed into one repo share one snapshot
    blob = repo_dir / "blobs" / sha256_file(checkpoint)
    snapshot = repo_dir / "snapshots" / commit / filename
    for folder in (blob.parent, snapshot.parent, repo_dir / "refs"):
        folder.mkdir(parents=True, exist_ok=True)
    _link_or_copy(checkpoint, blob)
    snapshot.unlink(missing_ok=True)
    try:
        snapshot.symlink_to(os.path.relpath(blob, snapshot.parent))
    except OSError:
        shutil.copyfile(blob, snapshot)
    (repo_dir / "refs" / "main").write_text(commit)
    return snapshot
