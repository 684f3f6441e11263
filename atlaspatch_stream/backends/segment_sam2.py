"""SAM2 tissue segmenter: upstream AtlasPatch's masks, computed a batch of thumbnails at a time.

Numerics (upstream reference §3.2 step 7 and §3.3), per thumbnail (h, w, 3) uint8:

1. squash to 1024x1024 with PIL BILINEAR (aspect ratio not kept);
2. SAM2's normalisation: /255, then ImageNet mean/std (the same tensor ops as `SAM2Transforms`);
3. SAM2.1 Hiera-Tiny image encoder, plus `no_mem_embed` on the lowest-resolution features, as
   `SAM2ImagePredictor.set_image` does;
4. one box prompt [0, 0, 1024, 1024] (normalised then scaled as the predictor does: the same numbers),
   `multimask_output=False`, no mask input;
5. the 256x256 low-res logits upsampled bilinearly (align_corners=False) to 1024x1024, kept where > 0.0;
6. PIL NEAREST back to (h, w).

Unlike upstream, which batches only the image encoder and loops over images for the decoder, the mask decoder also
runs once per batch (the box prompt, the same for every image, is embedded once and broadcast). With
`precision="float32"` (default) the masks equal `SAM2ImagePredictor(model, mask_threshold=0.0).set_image(img)` +
`predict(box=..., multimask_output=False)` image by image (tests check this, batched and alone): to get there the
decoder's small GEMM layers run per image inside the batched call (see `_per_image_gemms`). The image encoder is
~95% of the time; on CPU it is compute-bound, so batching pays off on GPUs, not on CPUs. `bfloat16`/`float16` run the model under autocast: faster on GPUs, but the logits move by
rounding, so pixels whose logit is near 0 can flip and masks are no longer bit-equal to upstream's.

The model is built from sam2's own `sam2.1_hiera_t.yaml` `model` node (as upstream instantiates its copy), without
the `build_sam2` post-processing overrides, and loaded strictly from `{"model": state_dict}`.

A thumbnail that cannot be prepared, or whose inference fails, fails alone: its slot holds a `SlideError`.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import ConfigError, SlideError, WeightsError, describe
from .devices import resolve_device
from .thumbnails import check_thumbnail
from .weights import fetch_hf_file, sha256_file

log = logging.getLogger("atlaspatch_stream")

SAM2_REPO_ID = "AtlasAnalyticsLab/AtlasPatch"
SAM2_FILENAME = "model.pth"
SAM2_OFFICIAL_SHA256 = "51481c42c1079738f8c506f4da6183002aa34b1eb27d79423ae8f802e052be22"
SAM2_CONFIG = "configs/sam2.1/sam2.1_hiera_t.yaml"
SAM_SIZE = 1024
# ImageNet statistics, as SAM2Transforms normalises.
_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)
_PRECISIONS = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_sam2_weights(explicit: Path | None) -> Path:
    """The SAM2 checkpoint to load: `explicit` (`--seg-weights`), else the HF cache / a download when online.

    Usable before any slide opens, so a run without weights stops at once.

    Args:
        explicit: a local checkpoint given by the user, or None for the official file.

    Returns:
        An existing file.

    Raises:
        WeightsError: `explicit` does not exist, or the official file is not cached and cannot be downloaded.
    """
    if explicit is not None:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise WeightsError(f"--seg-weights {path}: no such file")
        return path
    try:
        return fetch_hf_file(SAM2_REPO_ID, SAM2_FILENAME, local_flag="--seg-weights PATH")
    except WeightsError as exc:
        raise WeightsError(f"{exc}; or run without SAM2 weights with --segmenter otsu") from exc


def build_sam2_model(weights: Path | None, device: torch.device) -> torch.nn.Module:
    """SAM2.1 Hiera-Tiny from sam2's config, weights loaded strictly (random init when `weights` is None).

    Raises:
        WeightsError: the file is not a `{"model": state_dict}` checkpoint matching the architecture.
    """
    import sam2
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    config = OmegaConf.load(Path(sam2.__file__).parent / SAM2_CONFIG)
    OmegaConf.resolve(config)
    model = instantiate(config.model, _recursive_=True)
    if weights is not None:
        _load_strict(model, weights)
    return model.to(device).eval()


def _load_strict(model: torch.nn.Module, weights: Path) -> None:
    """Strict loading of the checkpoint's `model` entry; a file that is not one, or does not fit, is a WeightsError."""
    try:
        checkpoint = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(f"cannot read SAM2 weights {weights}: {describe(exc)}") from exc
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("model"), dict):
        raise WeightsError(f"SAM2 weights {weights} are not a {{'model': state_dict}} checkpoint")
    try:
        model.load_state_dict(checkpoint["model"], strict=True)
    except RuntimeError as exc:
        raise WeightsError(f"SAM2 weights {weights} do not fit SAM2.1 Hiera-Tiny: {describe(exc)}") from exc


def squash_for_sam(thumbnail: np.ndarray) -> np.ndarray:
    """Validate an RGB uint8 (h, w, 3) thumbnail and squash it to 1024x1024 with PIL BILINEAR.

    Raises:
        SlideError: wrong dtype, shape or an empty image.
    """
    check_thumbnail(thumbnail)
    image = Image.fromarray(np.ascontiguousarray(thumbnail), mode="RGB")
    return np.asarray(image.resize((SAM_SIZE, SAM_SIZE), Image.Resampling.BILINEAR))


def mask_to_thumbnail(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """A bool 1024x1024 mask resized with PIL NEAREST to (height, width), as upstream's `_resize_mask`."""
    image = Image.fromarray(mask.astype(np.uint8) * 255, mode="L")
    return np.asarray(image.resize((width, height), Image.Resampling.NEAREST)) > 127


class Sam2Segmenter:
    """Batched SAM2.1 Hiera-Tiny tissue segmentation (implements `protocols.Segmenter`)."""

    name = "sam2"

    def __init__(self, device: str = "cpu", precision: str = "float32", weights: Path | None = None,
                 batch_size: int = 1) -> None:
        """Settings only; `warm_up()` resolves weights and builds the model.

        Args:
            device: "cpu", "cuda" (CPU fallback with a warning) or "cuda:N".
            precision: "float32" (upstream-equal), "bfloat16" or "float16" (autocast).
            weights: a local checkpoint (`--seg-weights`); None = the official file from the HF cache.
            batch_size: thumbnails per model call; `segment` splits longer inputs.
        """
        if precision not in _PRECISIONS:
            raise ConfigError(f"unknown segmentation precision {precision!r}")
        if batch_size < 1:
            raise ConfigError("segmentation batch size must be >= 1")
        self.device_name = device
        self.precision = precision
        self.weights = weights
        self.batch_size = batch_size
        self.weights_sha256: str | None = None
        self.weights_path: Path | None = None
        self._model: Any = None
        self._device: torch.device | None = None
        self._lock = threading.Lock()

    @property
    def model(self) -> Any:
        """The loaded SAM2Base (after `warm_up`)."""
        if self._model is None:
            raise RuntimeError("Sam2Segmenter.warm_up() has not been called")
        return self._model

    def warm_up(self) -> None:
        """Resolve and hash the weights, build the model on the device, run one dummy batch.

        Raises:
            WeightsError: no weights, or weights that do not fit the model.
            ConfigError: an impossible device.
        """
        if self._model is not None:
            return
        device = resolve_device(self.device_name, "segmentation")
        path = resolve_sam2_weights(self.weights)
        self.weights_sha256 = check_sam2_weights(path)
        self.weights_path = path
        self._model = build_sam2_model(path, device)
        self._device = device
        self._infer(np.zeros((1, SAM_SIZE, SAM_SIZE, 3), np.uint8))

    def segment(self, thumbnails: Sequence[np.ndarray]) -> list[np.ndarray | Exception]:
        """One bool (h, w) mask per RGB uint8 thumbnail; a failing thumbnail's slot holds its SlideError.

        Args:
            thumbnails: upstream's segmentation thumbnails (mask resolution).

        Returns:
            Masks or exceptions, in input order.
        """
        if self._model is None:
            raise RuntimeError("Sam2Segmenter.segment() called before warm_up()")
        results: list[np.ndarray | Exception] = [SlideError("not segmented")] * len(thumbnails)
        ready: dict[int, np.ndarray] = {}
        for index, thumbnail in enumerate(thumbnails):
            try:
                ready[index] = squash_for_sam(thumbnail)
            except Exception as exc:
                results[index] = _as_slide_error(exc)
        order = sorted(ready)
        with self._lock:
            for start in range(0, len(order), self.batch_size):
                self._segment_chunk(order[start : start + self.batch_size], ready, thumbnails, results)
        return results

    def _segment_chunk(self, chunk: list[int], ready: dict[int, np.ndarray], thumbnails: Sequence[np.ndarray],
                       results: list[np.ndarray | Exception]) -> None:
        """Run one batch; when it fails, run its images one by one so only the guilty ones fail."""
        try:
            masks = self._infer(np.stack([ready[i] for i in chunk]))
        except Exception as exc:
            if len(chunk) == 1:
                if _is_device_failure(exc):
                    raise  # a broken device stops the run (DESIGN); retrying slide by slide cannot help
                results[chunk[0]] = _as_slide_error(exc)
                return
            log.warning("SAM2 batch of %d failed (%s); retrying one image at a time", len(chunk), describe(exc))
            for index in chunk:
                self._segment_chunk([index], ready, thumbnails, results)
            return
        for index, mask in zip(chunk, masks, strict=True):
            height, width = thumbnails[index].shape[:2]
            results[index] = mask_to_thumbnail(mask, height, width)

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        dtype = _PRECISIONS[self.precision]
        if dtype is None or self._device is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self._device.type, dtype=dtype)

    @torch.inference_mode()
    def _infer(self, batch: np.ndarray) -> np.ndarray:
        """uint8 (B, 1024, 1024, 3) -> bool (B, 1024, 1024) masks at SAM resolution."""
        pixels = self._normalise(batch)
        with self._autocast():
            embed, high_res = self._encode(pixels)
            logits = self._decode(embed, high_res)
        # The predictor upsamples float32 logits; do the same whatever the autocast dtype.
        masks = F.interpolate(logits.float(), (SAM_SIZE, SAM_SIZE), mode="bilinear", align_corners=False) > 0.0
        return masks[:, 0].cpu().numpy()

    def _normalise(self, batch: np.ndarray) -> torch.Tensor:
        """The same float ops as ToTensor + Normalize, done on the device after a uint8 upload."""
        assert self._device is not None
        pixels = torch.from_numpy(batch).to(self._device).permute(0, 3, 1, 2).float().div(255)
        mean = torch.tensor(_MEAN, dtype=torch.float32, device=self._device).view(1, 3, 1, 1)
        std = torch.tensor(_STD, dtype=torch.float32, device=self._device).view(1, 3, 1, 1)
        return pixels.sub(mean).div(std).contiguous()

    def _encode(self, pixels: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Image embeddings (B, 256, 64, 64) and the two high-res feature maps, as `set_image_batch` makes them."""
        model = self._model
        backbone = model.forward_image(pixels)
        _, feats, _, sizes = model._prepare_backbone_features(backbone)
        if model.directly_add_no_mem_embed:
            feats[-1] = feats[-1] + model.no_mem_embed
        batch = pixels.shape[0]
        maps = [feat.permute(1, 2, 0).view(batch, -1, *size) for feat, size in zip(feats, sizes, strict=True)]
        return maps[-1], maps[:-1]

    def _decode(self, embed: torch.Tensor, high_res: list[torch.Tensor]) -> torch.Tensor:
        """Low-res logits (B, 1, 256, 256) for the whole-image box: one prompt-encoder and one decoder call per batch.

        In float32 the decoder runs under `_per_image_gemms`, so its results are bit-equal to batch-of-one calls.
        """
        model = self._model
        batch = embed.shape[0]
        sparse, dense = self._box_prompt(embed.device)
        exact = self.precision == "float32"
        with _per_image_gemms(model.sam_mask_decoder) if exact else contextlib.nullcontext():
            logits, _, _, _ = model.sam_mask_decoder(
                image_embeddings=embed, image_pe=model.sam_prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse.expand(batch, -1, -1),
                dense_prompt_embeddings=dense.expand(batch, -1, -1, -1),
                multimask_output=False, repeat_image=False, high_res_features=high_res)
        return logits

    def _box_prompt(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Sparse (1, 3, 256) and dense (1, 256, 64, 64) embeddings of the box [0, 0, 1024, 1024].

        Every image gets the same prompt, so it is embedded once (with batch 1, exactly as the predictor does)
        and broadcast over the batch.
        """
        # [0, 0, 1024, 1024] / (w, h) * 1024 with w = h = 1024: exactly the corners the predictor computes.
        corners = torch.tensor([[[0.0, 0.0], [SAM_SIZE, SAM_SIZE]]], device=device)
        labels = torch.tensor([[2, 3]], dtype=torch.int, device=device)
        return self._model.sam_prompt_encoder(points=(corners, labels), boxes=None, masks=None)

    def close(self) -> None:
        """Drop the model and free device memory."""
        model, self._model = self._model, None
        if model is not None and self._device is not None and self._device.type == "cuda":
            model.to("cpu")
            del model
            torch.cuda.empty_cache()


@contextlib.contextmanager
def _per_image_gemms(module: torch.nn.Module) -> Iterator[None]:
    """Within the block, the module's Linear, ConvTranspose2d and LayerNorm2d layers run image by image along dim 0.

    BLAS libraries pick GEMM kernels by matrix shape, so a Linear over the decoder's 7 prompt tokens gives slightly
    different sums for a batch of B (M = 7B rows) than for one image (M = 7), and the channel mean of LayerNorm2d
    is reduced in a batch-dependent order: enough to flip mask pixels whose logit is near 0. Running these layers
    per image keeps the attention, the other norms and the mask product batched while making the result bit-equal
    to the single-image predictor (checked on CPU; GPU kernels may choose differently).
    """
    from sam2.modeling.sam2_utils import LayerNorm2d

    kinds = (torch.nn.Linear, torch.nn.ConvTranspose2d, LayerNorm2d)
    patched = [m for m in module.modules() if isinstance(m, kinds)]
    for layer in patched:
        layer.forward = _split_batch(layer.forward)  # type: ignore[method-assign]
    try:
        yield
    finally:
        for layer in patched:
            del layer.forward  # back to the class's method


def _split_batch(forward: Any) -> Any:
    """Wrap a layer's forward to run it on each image of dim 0 and concatenate the results."""

    def per_image(x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2 or x.shape[0] == 1:
            return forward(x)
        # A one-image slice of a channels-last batch keeps channels-last strides, while the single-image path
        # hands these layers NCHW tensors; the memory format changes the conv kernel and the reduction order.
        pieces = [x[i : i + 1].contiguous() if x.dim() == 4 else x[i : i + 1] for i in range(x.shape[0])]
        return torch.cat([forward(piece) for piece in pieces])

    return per_image


def check_sam2_weights(path: Path) -> str:
    """The sha256 of a SAM2 checkpoint (cached per file); warns when it is not the official AtlasPatch file.

    A different file is allowed (fine-tuned or random weights); its hash goes into the H5 attributes.

    Args:
        path: the checkpoint.

    Returns:
        Its hex sha256.
    """
    digest = sha256_file(path)
    if digest != SAM2_OFFICIAL_SHA256:
        log.warning("SAM2 weights %s (sha256 %s) are not the official %s/%s (sha256 %s); masks will differ from "
                    "upstream", path, digest, SAM2_REPO_ID, SAM2_FILENAME, SAM2_OFFICIAL_SHA256)
    return digest


_DEVICE_ERRORS = tuple(t for t in (torch.cuda.OutOfMemoryError, getattr(torch, "AcceleratorError", None)) if t)


def _is_device_failure(exc: BaseException) -> bool:
    """Out of memory even at batch size 1, or a CUDA/accelerator error."""
    return isinstance(exc, _DEVICE_ERRORS) or (isinstance(exc, RuntimeError) and "CUDA error" in str(exc))


def _as_slide_error(exc: BaseException) -> SlideError:
    if isinstance(exc, SlideError):
        return exc
    return SlideError(f"segmentation failed: {describe(exc)}")
