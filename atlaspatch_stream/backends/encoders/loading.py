"""Weights for built-in encoders: where the file is, how it is read, how it goes into the offline-built model.

Resolution order for one encoder: an explicit `--weights NAME=PATH` file; else the cache upstream itself fills
(Hugging Face cache for hub models, under upstream's exact repo id and file names; `$TORCH_HOME/hub/checkpoints/` for
torchvision; upstream's own folder for CHIEF); else a download when online, under the same names; else `WeightsError`
naming the file, the folder looked in and how to supply it. All of this runs in
`EncoderRegistry.prepare`, i.e. before the first slide is opened.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...errors import MissingExtraError, WeightsError
from .. import weights as wt
from .spec import EncoderSpec

if TYPE_CHECKING:  # pragma: no cover
    import torch

log = logging.getLogger(__name__)

# Checkpoint containers seen in the wild ({"model": sd}, {"state_dict": sd}, training pickles).
_CONTAINER_KEYS = ("state_dict", "model", "module", "teacher")


def import_extra(module: str, message: str) -> Any:
    """Import an optional package (or one of its modules), or raise `MissingExtraError(message)` saying how to
    install it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise MissingExtraError(message) from exc


def weights_flag(name: str) -> str:
    """The command-line spelling that supplies a local file for `name`."""
    return f"--weights {name}=PATH"


def resolve_weights(spec: EncoderSpec, override: Path | None = None) -> Path | None:
    """The local weights file of one encoder, downloading it when allowed.

    Args:
        spec: the encoder.
        override: a file named with `--weights NAME=PATH`; wins over every cache.

    Returns:
        The file, or None for weight-free encoders.

    Raises:
        WeightsError: the file is not to be had (message names the file, the folder searched and the remedy).
    """
    if override is not None:
        path = Path(override).expanduser()
        if not path.is_file():
            raise WeightsError(f"{spec.name}: weights file {path} given with --weights does not exist")
        return path
    kind = spec.weights.kind
    if kind == "none":
        return None
    if kind == "local":
        return _upstream_copy(spec)
    if kind == "torchvision":
        return _torchvision_file(spec)
    return _hf_file(spec)


def find_local_weights(spec: EncoderSpec, override: Path | None = None) -> Path | None:
    """The weights file already on this machine (override, HF cache, torchvision cache or upstream's own copy);
    never downloads."""
    if override is not None:
        return Path(override) if Path(override).is_file() else None
    source = spec.weights
    if source.kind == "hf":
        return wt.find_hf_file(source.repo_id or "", *source.files)
    target = _torch_hub_file(spec)
    return target if target is not None and target.is_file() else None


def _torch_hub_file(spec: EncoderSpec) -> Path | None:
    """Where torchvision (or upstream itself, for files it fetches outside any hub) keeps this file, if anywhere."""
    source = spec.weights
    if source.kind == "torchvision":
        return wt.torch_hub_checkpoint(source.filename or "")
    if source.kind == "local" and source.folder and source.filename:
        return wt.torch_hub_dir() / source.folder / source.filename
    return None


def _upstream_copy(spec: EncoderSpec) -> Path:
    """The copy upstream itself downloaded (CHIEF: `$TORCH_HOME/hub/atlas_patch/chief/`), else WeightsError."""
    source = spec.weights
    target = _torch_hub_file(spec)
    if target is not None and target.is_file():
        return target
    where = f" ({source.note})" if source.note else ""
    looked = f"; not found where upstream keeps its copy, {target}" if target is not None else ""
    raise WeightsError(
        f"{spec.name}: weights {source.filename or 'file'} have no automatic download{where}{looked}; "
        f"supply a local copy with {weights_flag(spec.name)}"
    )


def _torchvision_file(spec: EncoderSpec) -> Path:
    filename = spec.weights.filename or ""
    target = wt.torch_hub_checkpoint(filename)
    if target.is_file():
        return target
    message = (
        f"{spec.name}: weights {filename} not found in torchvision's cache {target.parent}; run once with network "
        f"access (downloads {spec.weights.url}), copy the file there, or pass {weights_flag(spec.name)}"
    )
    if wt.hf_offline() or not spec.weights.url:
        raise WeightsError(f"{message} (offline)")
    import torch

    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(spec.weights.url, str(target), progress=False)
    except Exception as exc:  # network errors of every kind mean "no weights" to the user
        raise WeightsError(f"{message} (download failed: {type(exc).__name__}: {exc})") from exc
    return target


def _hf_file(spec: EncoderSpec) -> Path:
    source = spec.weights
    try:
        return wt.fetch_hf_file(source.repo_id or "", *source.files, local_flag=weights_flag(spec.name))
    except WeightsError as exc:
        raise WeightsError(f"{spec.name}: {exc}{_gate_note(spec)}") from exc


def _gate_note(spec: EncoderSpec) -> str:
    if not spec.gated:
        return ""
    licence = f" (licence: {spec.licence})" if spec.licence else ""
    return (
        f". The repo is gated{licence}: accept its terms at https://huggingface.co/{spec.weights.repo_id}, "
        "then set HF_TOKEN (or run `hf auth login`) and run once online"
    )


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A flat {key: tensor} from a `.safetensors` file or a `.pth/.bin/.pt` pickle (weights_only).

    Common wrappers ({"model": ...}, {"state_dict": ...}) and a `module.` prefix (DataParallel) are removed.

    Raises:
        WeightsError: unreadable file, or a pickle holding non-tensor objects.
    """
    path = Path(path)
    try:
        raw = _read_raw(path)
    except Exception as exc:
        raise WeightsError(
            f"cannot read weights {path}: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}. "
            "Pickles are read with torch.load(weights_only=True); re-save foreign pickles as a plain state dict "
            "or .safetensors"
        ) from exc
    state = _unwrap(raw)
    if not state or not all(hasattr(v, "shape") for v in state.values()):
        raise WeightsError(f"weights {path} hold no flat state dict of tensors")
    if all(k.startswith("module.") for k in state):
        return select_prefix(state, "module.")
    return state


def _read_raw(path: Path) -> Any:
    if path.name.endswith(".index.json"):  # sharded checkpoint: the shards lie beside the index
        import json

        merged: dict[str, Any] = {}
        for shard in sorted(set(json.loads(path.read_text())["weight_map"].values())):
            merged.update(_unwrap(_read_raw(path.parent / shard)))
        return merged
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    import torch

    return torch.load(str(path), map_location="cpu", weights_only=True)


def _unwrap(raw: Any) -> dict[str, Any]:
    while isinstance(raw, Mapping):
        inner = [raw[k] for k in _CONTAINER_KEYS if isinstance(raw.get(k), Mapping)]
        if not inner or any(hasattr(v, "shape") for v in raw.values()):
            return dict(raw)
        raw = inner[0]
    return {}


def select_prefix(state: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """The entries under `prefix`, with the prefix removed (others dropped)."""
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def drop_prefixes(state: Mapping[str, Any], prefixes: tuple[str, ...]) -> dict[str, Any]:
    """The state dict without the entries whose key starts with any of `prefixes` (e.g. a classifier head)."""
    return {k: v for k, v in state.items() if not k.startswith(prefixes)}


def load_strict(model: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> torch.nn.Module:
    """Load `state` into `model` strictly, by assignment, failing loudly on any key or shape mismatch.

    Tensors are cast to the dtype of the tensor they replace, so an fp16/bf16 checkpoint gives an fp32 model (the
    runtime decides precision). Assignment makes this work for models built on the meta device.

    Raises:
        WeightsError: missing keys, unexpected keys or shape mismatches (first few of each named).
    """
    import torch

    own = model.state_dict(keep_vars=True)
    # Checkpoints saved before BatchNorm counted batches lack `num_batches_tracked`; it is unused in eval mode.
    state = dict(state)
    for key in own:
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = torch.tensor(0, dtype=torch.long)
    _check_keys(own, state)
    cast = {k: v.to(own[k].dtype) if v.is_floating_point() else v for k, v in state.items()}
    model.load_state_dict(cast, strict=True, assign=True)
    return model


def load_tower(model: torch.nn.Module, state: Mapping[str, torch.Tensor], path: Path, name: str) -> torch.nn.Module:
    """Strictly load a library-built tower (materialised first when built on the meta device), in eval mode.

    Raises:
        WeightsError: keys or shapes that do not fit, naming the file and the encoder.
    """
    if next(model.parameters()).device.type == "meta":
        model = model.to_empty(device="cpu")
    try:
        return load_strict(model, state).eval()
    except WeightsError as exc:
        raise WeightsError(f"weights {path} do not fit encoder {name}: {exc}") from exc


def _check_keys(own: Mapping[str, Any], state: Mapping[str, Any]) -> None:
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k} {tuple(state[k].shape)} != {tuple(own[k].shape)}"
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    problems = [
        f"{label} ({len(items)}): {', '.join(items[:5])}{' ...' if len(items) > 5 else ''}"
        for label, items in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatch", shapes),
        )
        if items
    ]
    if problems:
        raise WeightsError("checkpoint does not fit the architecture: " + "; ".join(problems))


def default_load(model: torch.nn.Module, path: str) -> torch.nn.Module:
    """The plain recipe: read the file, load strictly."""
    return load_strict(model, read_state_dict(path))


def filtered_load(transform: Callable[[dict[str, Any], Any], dict[str, Any]]) -> Callable[[Any, str], Any]:
    """A `load_weights` callable that applies `transform(state, model)` before the strict load."""

    def load(model: Any, path: str) -> Any:
        return load_strict(model, transform(read_state_dict(path), model))

    return load


def has_unsaved_buffers(model: torch.nn.Module) -> bool:
    """Whether the model has buffers that a state dict does not carry (then the meta fast path is unsafe)."""
    saved = set(model.state_dict().keys())
    return any(name not in saved for name, _ in model.named_buffers())


def materialize(spec: EncoderSpec, path: Path | None) -> torch.nn.Module:
    """Build the architecture on CPU and load its weights; `eval()` mode.

    With `spec.meta_load` the model is built on the meta device, given empty CPU storage and filled by assignment,
    which skips the random init (seconds for ViT-g). Models with unsaved buffers are built normally (their buffers
    would stay garbage on the fast path).

    Raises:
        WeightsError: the file does not fit the architecture or cannot be read.
    """
    import torch

    if path is not None and spec.meta_load:
        with torch.device("meta"):
            model = spec.build()
        model = model.to_empty(device="cpu")
    else:
        model = spec.build()
    if path is not None:
        model = _load_into(spec, model, path)
    return model.eval()


def _load_into(spec: EncoderSpec, model: Any, path: Path) -> Any:
    loader = spec.load_weights or default_load
    try:
        loaded = loader(model, str(path))
    except WeightsError as exc:
        raise WeightsError(f"{spec.name}: weights {path}: {exc}") from exc
    except (RuntimeError, KeyError, ValueError) as exc:
        raise WeightsError(f"{spec.name}: cannot load weights {path}: {type(exc).__name__}: {exc}") from exc
    return loaded if loaded is not None else model
