"""`TorchEncoder`: a built-in encoder loaded once, fed decoded uint8 batches, preprocessing done on its device.

Upstream turns every patch into a PIL image and runs torchvision transforms on the CPU, one patch at a time. Here the
whole batch goes to the device once as uint8, and resize / centre crop / normalise run as tensor ops that replay the
same transform: torchvision's `Resize(int)` output size and `CenterCrop` rounding, and Pillow's own fixed-point
resampling (so the model sees exactly the pixels upstream's PIL path gives it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np

from ...cpu import native_bf16
from ...errors import ConfigError
from .folding import fold_batch_norms
from .spec import EncoderSpec, Preprocess

log = logging.getLogger(__name__)

_CONV_FAMILIES = ("resnet", "convnext")
# On a CPU a batch goes through the model in slices of this many patches: their activations take half of a 32-patch
# batch's memory, and each patch's features do not depend on the slice (perf/bench_cpu_slices.py: equal outputs,
# resnet18 at 1.02x and ViT-S/16 at 0.95x the whole batch's time). Slices of 8 were faster alone, but 1.06-1.13x
# slower in `process`, where decoding threads share the cores with every parallel region of the forward pass.
CPU_SLICE = 16


def resized_size(height: int, width: int, resize: int | tuple[int, int]) -> tuple[int, int]:
    """The output size of torchvision `Resize(resize)`: an int scales the shorter side, a pair squashes."""
    if isinstance(resize, tuple):
        return resize
    short, long = (height, width) if height <= width else (width, height)
    new_short, new_long = resize, int(resize * long / short)
    return (new_short, new_long) if height <= width else (new_long, new_short)


def crop_box(height: int, width: int, crop: int) -> tuple[int, int]:
    """Top and left offsets of torchvision's `CenterCrop(crop)` (round half to even, as it uses `round`)."""
    return int(round((height - crop) / 2.0)), int(round((width - crop) / 2.0))


def preprocess_batch(x: Any, pre: Preprocess) -> Any:
    """Resize, centre-crop and normalise a float (B, 3, H, W) batch in [0, 1], on its own device.

    Args:
        x: the batch.
        pre: the encoder's transform.

    Returns:
        The normalised model input (B, 3, S, S), float32.
    """
    import torch

    if pre.resize is not None:
        size = resized_size(x.shape[-2], x.shape[-1], pre.resize)
        x = _RESAMPLERS[pre.resampler](x, size, pre)
    if pre.crop is not None:
        x = _center_crop(x, pre.crop)
    mean = torch.tensor(pre.mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(pre.std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean) / std


def pil_like_resize(x: Any, size: tuple[int, int], pre: Preprocess) -> Any:
    """Resize exactly as Pillow does on 8-bit images: horizontal pass, then vertical, each rounded to 8 bits.

    Each pass multiplies by Pillow's own fixed-point coefficient matrix (22 fractional bits, `pil_resample_matrix`)
    in float64, where every product and sum of 8-bit values and those integers is exact, then adds half and floors as
    Pillow's `clip8` does. The result equals `PIL.Image.resize` bit for bit. `x` holds values k/255.
    """
    import torch
    import torch.nn.functional as F

    if pre.interpolation == "nearest":
        return F.interpolate(x, size=size, mode="nearest")
    height, width = x.shape[-2:]
    y = x.to(torch.float64).mul(255.0).round_()
    if width != size[1]:
        y = _fixed_point_pass(y, pil_resample_matrix(width, size[1], pre.interpolation))
    if height != size[0]:
        y = _fixed_point_pass(y.transpose(-1, -2), pil_resample_matrix(height, size[0], pre.interpolation))
        y = y.transpose(-1, -2)
    return y.to(x.dtype).div_(255.0)


def pil_resized_crops(pixels: np.ndarray, pre: Preprocess) -> np.ndarray | None:
    """Resize and centre-crop uint8 (B, H, W, 3) patches with Pillow itself, one patch at a time as upstream's
    transform does (so bit for bit its pixels, like `pil_like_resize`, at a fraction of the cost on a CPU); None
    where this path does not apply (not Pillow's resampling, nearest, or a crop larger than the resized patch)."""
    from PIL import Image

    if pre.resampler != "pil" or pre.interpolation not in _FILTERS or pre.resize is None:
        return None
    height, width = resized_size(pixels.shape[1], pixels.shape[2], pre.resize)
    crop_h, crop_w = (pre.crop, pre.crop) if pre.crop is not None else (height, width)
    if crop_h > height or crop_w > width:
        return None
    top, left = crop_box(height, width, crop_h) if pre.crop is not None else (0, 0)
    box = (left, top, left + crop_w, top + crop_h)
    resample = Image.Resampling[pre.interpolation.upper()]  # the filters `pil_resample_matrix` replays
    out = np.empty((len(pixels), crop_h, crop_w, 3), dtype=np.uint8)
    for i, patch in enumerate(pixels):
        image = Image.fromarray(np.ascontiguousarray(patch))
        out[i] = np.asarray(image.resize((width, height), resample).crop(box))
    return out


def tensor_resize(x: Any, size: tuple[int, int], pre: Preprocess) -> Any:
    """torchvision's antialiased resize on the uint8 tensor, as transformers 5 image processors run it."""
    import torch
    from torchvision.transforms.v2 import functional as TF

    pixels = x.mul(255.0).round_().to(torch.uint8)
    resized = TF.resize(pixels, list(size), interpolation=_tv_mode(pre.interpolation), antialias=pre.antialias)
    return resized.to(x.dtype).div_(255.0)


def tensor_float_resize(x: Any, size: tuple[int, int], pre: Preprocess) -> Any:
    """torchvision's antialiased resize on the [0, 1] float tensor (processors that rescale before resizing)."""
    from torchvision.transforms.v2 import functional as TF

    return TF.resize(x, list(size), interpolation=_tv_mode(pre.interpolation), antialias=pre.antialias)


def _fixed_point_pass(y: Any, matrix: np.ndarray) -> Any:
    import torch

    weights = torch.from_numpy(matrix).to(device=y.device)
    summed = torch.matmul(y, weights.T).add_(_HALF)
    return summed.div_(_ONE).floor_().clamp_(0.0, 255.0)


_BITS = 22  # Pillow's PRECISION_BITS for 8-bit images: 32 - 8 - 2
_ONE = float(1 << _BITS)
_HALF = float(1 << (_BITS - 1))


def _bilinear(t: np.ndarray) -> np.ndarray:
    t = np.abs(t)
    return np.where(t < 1.0, 1.0 - t, 0.0)


def _bicubic(t: np.ndarray) -> np.ndarray:
    a, t = -0.5, np.abs(t)
    near = ((a + 2.0) * t - (a + 3.0)) * t * t + 1
    far = (((t - 5) * t + 8) * t - 4) * a
    return np.where(t < 1.0, near, np.where(t < 2.0, far, 0.0))


_FILTERS = {"bilinear": (_bilinear, 1.0), "bicubic": (_bicubic, 2.0)}
_RESAMPLERS = {"pil": pil_like_resize, "tensor_uint8": tensor_resize, "tensor_float": tensor_float_resize}


@functools.cache
def _tv_mode(interpolation: str) -> Any:
    """The torchvision InterpolationMode of an interpolation name (torchvision imported on first use)."""
    from torchvision.transforms import InterpolationMode

    return InterpolationMode(interpolation)


@functools.lru_cache(maxsize=64)
def pil_resample_matrix(in_size: int, out_size: int, interpolation: str) -> np.ndarray:
    """Pillow's resampling coefficients (`precompute_coeffs` + `normalize_coeffs_8bpc`) as an (out, in) matrix.

    Entries are the integers Pillow uses (weights × 2**22, rounded half away from zero), stored as float64.
    """
    kernel, base_support = _FILTERS[interpolation]
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = base_support * filterscale
    matrix = np.zeros((out_size, in_size), dtype=np.float64)
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size)
        taps = np.arange(xmin, xmax)
        weights = kernel((taps - center + 0.5) * (1.0 / filterscale))
        total = weights.sum()
        if total != 0.0:
            weights = weights / total
        scaled = weights * (1 << _BITS)
        matrix[xx, xmin:xmax] = np.trunc(np.where(scaled < 0, scaled - 0.5, scaled + 0.5))
    return matrix


def _center_crop(x: Any, crop: int) -> Any:
    import torch.nn.functional as F

    height, width = x.shape[-2:]
    if height < crop or width < crop:  # torchvision pads with zeros first
        pad_h, pad_w = max(crop - height, 0), max(crop - width, 0)
        x = F.pad(x, (pad_w // 2, (pad_w + 1) // 2, pad_h // 2, (pad_h + 1) // 2))
        height, width = x.shape[-2:]
    top, left = crop_box(height, width, crop)
    return x[..., top : top + crop, left : left + crop]


def _check_batch(name: str, pixels: Any) -> None:
    if pixels.ndim != 4 or pixels.shape[-1] != 3:
        raise ValueError(f"{name}: expected uint8 (B, H, W, 3), got {tuple(pixels.shape)}")


def autocast_dtype(device: str, precision: str) -> Any:
    """The autocast dtype for a precision on a device, or None for exact float32.

    "float16" means fp16 autocast on CUDA; on a CPU, bf16 autocast where the CPU has native bf16 (AVX512-BF16 or
    AMX), else float32 as upstream runs it. CPU fp16 kernels are slow or missing, and emulated bf16 is several times
    slower than float32 (resnet18 on an AVX2 EPYC: 3.9 against 22 img/s).
    """
    import torch

    if precision == "float32":
        return None
    if precision == "bfloat16":
        return torch.bfloat16
    if precision == "float16":
        if device.startswith("cuda"):
            return torch.float16
        return torch.bfloat16 if native_bf16() else None
    raise ConfigError(f"unknown precision {precision!r}")


def precision_label(device: str, precision: str) -> str:
    """What a requested precision runs as on a device, in words: "float32", "bfloat16 autocast" or "float16
    autocast", with the reason where "float16" became something else on a CPU."""
    dtype = autocast_dtype(device, precision)
    ran = "float32" if dtype is None else f"{str(dtype).removeprefix('torch.')} autocast"
    if precision == "float16" and not device.startswith("cuda"):
        why = "this CPU has native bf16" if dtype is not None else "no native bf16 on this CPU"
        return f"{ran} (float16 requested; {why})"
    return ran


class TorchEncoder:
    """A built-in encoder: spec + weights file -> a model on `device` answering `encode` (implements `Encoder`).

    Args:
        spec: the encoder.
        device: "cpu", "cuda", "cuda:1", ...
        precision: "float32" | "float16" | "bfloat16".
        weights: the resolved weights file (None for weight-free encoders or an injected `model`).
        model: an already built module to use instead of building one (tests, seeded random weights). It is
            prepared in place: on a CPU a convolutional model's batch norms are folded into its convolutions
            (`folding.fold_batch_norms`).
        compile: run the model through `torch.compile` (opt-in, `--compile`): one fixed batch shape, so callers pass
            full batches (`fixed_batch`), padding the tail.
        cpu_slice: on a CPU, the patches each forward pass takes (`CPU_SLICE`); a batch runs as consecutive slices.

    Besides `encode` (numpy or torch in, numpy out) it implements `DeviceEncoder.encode_device`: a uint8 torch batch
    on its device in, features on the device out, with no host synchronisation (the CUDA stream runner uses it).
    """

    def __init__(self, spec: EncoderSpec, *, device: str = "cpu", precision: str = "float32",
                 weights: Path | None = None, model: Any = None, compile: bool = False,
                 cpu_slice: int = CPU_SLICE) -> None:
        if cpu_slice < 1:
            raise ValueError(f"cpu_slice must be >= 1, got {cpu_slice}")
        self.spec = spec
        self.cpu_slice = cpu_slice
        self.name = spec.name
        self.dim = spec.dim
        self.device = device
        self._on_cpu = device.split(":")[0] == "cpu"  # folded norms, Pillow's own resizing, forward slices
        self.precision = precision
        self.weights = weights
        self.fixed_batch = compile
        self._channels_last = any(word in spec.family for word in _CONV_FAMILIES)
        self._model = model
        self._compiled: Any = None
        self._ready = False
        self._lock = threading.Lock()

    def warm_up(self) -> None:
        """Build and load the model, move it to the device and run one dummy batch (idempotent)."""
        with self._lock:
            if self._ready:
                return
            self._model = self._prepared_model()
            # logged (shown with -v) once per run, since each run warms each encoder up once
            log.info("encoder %s runs in %s", self.name, self.precision_ran)
            if self._compiled is None:  # a compiled model compiles at its first full batch, not at a dummy one
                edge = self.spec.input_size or 224
                self._run(np.zeros((1, edge, edge, 3), dtype=np.uint8))
            self._ready = True

    @property
    def precision_ran(self) -> str:
        """What the forward pass runs in (`precision_label`), or "exact (weight-free)" for a model with its own uint8
        path (implements `PrecisionReporting`)."""
        if getattr(self._model, "takes_uint8", False):
            return "exact (weight-free)"
        return precision_label(self.device, self.precision)

    def _prepared_model(self) -> Any:
        import torch

        from .loading import materialize

        model = self._model if self._model is not None else materialize(self.spec, self.weights)
        model = model.to(self.device).eval()
        if self._channels_last:
            if self._on_cpu:
                log.debug("encoder %s: %d batch norms folded into their convolutions", self.name,
                          fold_batch_norms(model))
            model = model.to(memory_format=torch.channels_last)
        if self.fixed_batch and not getattr(model, "takes_uint8", False):
            self._compiled = torch.compile(functools.partial(self._plain_forward, model), dynamic=False)
        return model

    def encode(self, pixels: Any) -> np.ndarray:
        """uint8 (B, P, P, 3) RGB, numpy or a torch tensor on any device -> float32 (B, dim) numpy."""
        if not self._ready:
            self.warm_up()
        return self._run(pixels)

    def encode_device(self, pixels: Any) -> Any:
        """uint8 (B, P, P, 3) torch tensor -> float32 (B, dim) torch tensor on the encoder's device.

        Work is only queued (on the calling thread's current CUDA stream); nothing waits for it here.
        """
        if not self._ready:
            self.warm_up()
        _check_batch(self.name, pixels)
        return self._device_features(pixels)

    def _device_features(self, pixels: Any) -> Any:
        import torch

        if getattr(self._model, "takes_uint8", False):
            out = self._model.encode_uint8(pixels)
            return torch.as_tensor(out).to(self.device, non_blocking=True)
        step = self.cpu_slice if self._on_cpu and self._compiled is None else len(pixels)
        with torch.inference_mode():
            if len(pixels) <= step:
                return self._features(pixels)
            return torch.cat([self._features(pixels[i : i + step]) for i in range(0, len(pixels), step)])

    def _features(self, pixels: Any) -> Any:
        x = self.model_input(pixels)
        with self._autocast():
            return self._forward(x).flatten(1).float()

    def _run(self, pixels: Any) -> np.ndarray:
        _check_batch(self.name, pixels)
        if len(pixels) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        if getattr(self._model, "takes_uint8", False):  # weight-free encoders with their own uint8 path
            return np.asarray(self._model.encode_uint8(pixels), dtype=np.float32)
        return self._device_features(pixels).cpu().numpy()

    def model_input(self, pixels: Any) -> Any:
        """The tensor the model sees for a uint8 batch: on the device, /255, resized, cropped, normalised."""
        import torch

        pre = self.spec.preprocess
        if pre is not None and self._on_cpu:  # Pillow itself resizes on a CPU: exact and far cheaper
            host = pixels.numpy() if isinstance(pixels, torch.Tensor) else pixels
            cropped = pil_resized_crops(host, pre)
            if cropped is not None:
                pixels, pre = cropped, dataclasses.replace(pre, resize=None, crop=None)
        source = torch.from_numpy(np.ascontiguousarray(pixels)) if isinstance(pixels, np.ndarray) else pixels
        x = source.to(self.device, non_blocking=True)
        x = x.permute(0, 3, 1, 2).float().div_(255.0)
        if pre is not None:
            x = preprocess_batch(x, pre)
        if self._channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def _forward(self, x: Any) -> Any:
        if self._compiled is not None:
            return self._compiled(x)
        return self._plain_forward(self._model, x)

    def _plain_forward(self, model: Any, x: Any) -> Any:
        if self.spec.forward is not None:
            return self.spec.forward(model, x)
        return model(x)

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        import torch

        dtype = autocast_dtype(self.device, self.precision)
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.split(":")[0], dtype=dtype)

    def close(self) -> None:
        """Drop the model and free cached device memory."""
        with self._lock:
            self._model = None
            self._compiled = None
            self._ready = False
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()

    def __repr__(self) -> str:
        return f"TorchEncoder({self.name!r}, dim={self.dim}, device={self.device!r}, precision={self.precision!r})"


class CustomTorchEncoder:
    """A plugin encoder from `register_custom_encoder`: upstream's per-patch PIL preprocess, whole-model cast.

    Plugins keep upstream's semantics exactly (their preprocess is a PIL -> CHW tensor callable that we cannot
    replay on the device): each patch is preprocessed on the CPU, the batch is stacked, moved and cast to `dtype`.
    """

    def __init__(self, name: str, dim: int, loader: Any, device: Any, dtype: Any, non_blocking: bool = False) -> None:
        from .spec import CustomEncoderComponents

        parts = loader(device, dtype)
        if not isinstance(parts, CustomEncoderComponents):
            raise TypeError(f"custom encoder {name!r}: loader must return CustomEncoderComponents, got {type(parts)!r}")
        self.name, self.dim = name, dim
        self.device, self.dtype, self.non_blocking = device, dtype, non_blocking
        self._model = parts.model.to(device=device, dtype=dtype).eval()
        self._preprocess = parts.preprocess
        self._forward = parts.forward_fn

    @property
    def precision_ran(self) -> str:
        """The dtype the whole model was cast to, as upstream casts it (implements `PrecisionReporting`)."""
        return f"{str(self.dtype).removeprefix('torch.')} (the whole model cast)"

    def warm_up(self) -> None:
        """Nothing to do: the loader already ran when the encoder was created."""

    def encode(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 (B, P, P, 3) RGB -> float32 (B, dim)."""
        import torch
        from PIL import Image

        if len(pixels) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        batch = torch.stack([self._preprocess(Image.fromarray(np.ascontiguousarray(p))) for p in pixels])
        with torch.inference_mode():
            x = batch.to(self.device, non_blocking=self.non_blocking).to(self.dtype)
            out = self._forward(x) if self._forward is not None else self._model(x)
            return out.flatten(1).float().cpu().numpy() if out.ndim > 2 else out.float().cpu().numpy()

    def close(self) -> None:
        """Move the model off the device, as upstream's cleanup does, and drop it."""
        self._model = self._model.to("cpu")
        self._model = None


class ExtractorEncoder:
    """Adapts an upstream-style feature extractor (`extract_batch`, `cleanup`) to our `Encoder` protocol."""

    def __init__(self, extractor: Any) -> None:
        self._extractor = extractor
        self.name = str(extractor.name)
        self.dim = int(extractor.embedding_dim)

    def warm_up(self) -> None:
        """Nothing to do: upstream extractors load in their builder."""

    def encode(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 (B, P, P, 3) RGB -> float32 (B, dim), via `extract_batch(list_of_HWC_uint8, batch_size=B)`."""
        if len(pixels) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        out = self._extractor.extract_batch(list(pixels), batch_size=len(pixels))
        out = np.asarray(out.detach().cpu() if hasattr(out, "detach") else out, dtype=np.float32)
        return out.reshape(len(pixels), -1)

    def close(self) -> None:
        """Call the extractor's `cleanup()`."""
        cleanup = getattr(self._extractor, "cleanup", None)
        if cleanup is not None:
            cleanup()
