"""The pipeline's `EncoderSet`s: the requested encoders run together on each decoded batch.

- `EncoderGroup` (CPU): `submit` runs every encoder at once, on a thread of the group's own; one batch in flight.
- `CudaEncoderGroup` (CUDA): every `DeviceEncoder` on its own CUDA stream, fed through a fixed ring of device slots
  (`backends.cuda_streams.EncoderCudaStreams`), so several batches are in flight and the device never waits for the host;
  encoders without a device path (plugins) run on the host copy at `submit`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from ...batching import to_host
from ...items import Encoded
from ...protocols import DeviceEncoder, Encoder, PrecisionReporting

log = logging.getLogger(__name__)


def nonfinite_rows(features: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Bool (B,) masks of the rows holding NaN or Inf, for the encoders that have any (host features, on the CPU)."""
    masks = {name: ~np.isfinite(values).all(axis=1) for name, values in features.items()}
    return {name: mask for name, mask in masks.items() if mask.any()}


class EncoderGroup:
    """Every requested encoder; each batch is decoded once and handed to all of them in turn.

    The forward passes run on one thread of the group's own, whichever thread calls `submit`: glibc gives each thread
    its own arena, and forward passes that moved between the pipeline's worker threads left their freed activations
    in several arenas at once (a higher peak RSS for the same work; README "Performance").
    """

    def __init__(self, encoders: Sequence[Encoder]) -> None:
        self.encoders = list(encoders)
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="encoders")

    @property
    def names(self) -> tuple[str, ...]:
        """Encoder names, in the order requested."""
        return tuple(e.name for e in self.encoders)

    @property
    def dims(self) -> Mapping[str, int]:
        """Declared output width of each encoder."""
        return {e.name: int(e.dim) for e in self.encoders}

    @property
    def depth(self) -> int:
        """One batch at a time: `submit` does the work."""
        return 1

    @property
    def precision_ran(self) -> Mapping[str, str]:
        """What each encoder's forward pass runs in ("as its plugin runs it" for encoders that do not say)."""
        return {e.name: e.precision_ran if isinstance(e, PrecisionReporting) else "as its plugin runs it"
                for e in self.encoders}

    def warm_up(self) -> None:
        """Load every model, in the order requested (a bad weight file fails before any slide)."""
        for encoder in self.encoders:
            encoder.warm_up()

    def submit(self, pixels: Any, names: frozenset[str] | None) -> Encoded:
        """Encode now: float32 (B, D) per encoder in `names` (None: all; reused slides need only their missing
        sets) and their non-finite rows; the result is the ticket."""
        return self._thread.submit(self._encode, pixels, names).result()

    def _encode(self, pixels: Any, names: frozenset[str] | None) -> Encoded:
        host = to_host(pixels)
        features = {e.name: e.encode(host) for e in self.encoders if names is None or e.name in names}
        return Encoded(features, nonfinite_rows(features))

    def collect(self, ticket: object) -> Encoded:
        """What `submit` computed."""
        assert isinstance(ticket, Encoded)
        return ticket

    def close(self) -> None:
        """Free every model's memory, even when one close fails, and end the group's thread."""
        errors = []
        for encoder in self.encoders:
            try:
                encoder.close()
            except Exception as exc:  # noqa: BLE001 - close the others, then report the first failure
                errors.append(exc)
        self._thread.shutdown(wait=False)
        if errors:
            raise errors[0]


@dataclass(frozen=True)
class _Ticket:
    ring: Any  # the ring's ticket (None when no device encoder was asked)
    host: Encoded


class CudaEncoderGroup(EncoderGroup):
    """Encoders on a CUDA device, each on its own stream, through a ring of `slots` batches in flight.

    Args:
        encoders: the encoders; `DeviceEncoder`s run on the device, the others on a host copy of each batch.
        device: the feature device ("cuda:N").
        batch_size: rows per batch (`--feature-batch-size`), the ring's slot size.
        patch_size: patch edge, to size the ring from the memory budget.
        memory_budget: share of the device's free memory for the ring, the patch queue and the tile cache.
    """

    def __init__(self, encoders: Sequence[Encoder], device: str, *, batch_size: int, patch_size: int,
                 memory_budget: float) -> None:
        super().__init__(encoders)
        self.device = device
        self.batch_size = batch_size
        self.patch_size = patch_size
        self.memory_budget = memory_budget
        self._on_device = [e for e in self.encoders if isinstance(e, DeviceEncoder)]
        self._on_host = [e for e in self.encoders if not isinstance(e, DeviceEncoder)]
        self._ring: Any = None

    @property
    def depth(self) -> int:
        """Batches in flight: one less than the ring's slots, so `submit` never waits on a slot."""
        return max(1, (self._ring.slots if self._ring is not None else 2) - 1)

    def warm_up(self) -> None:
        """Load every model, then build the ring (sized from the device's free memory and the budget)."""
        from ..cuda_streams import EncoderCudaStreams, device_ops, free_bytes, ring_layout

        super().warm_up()
        if self._on_device:
            plan = ring_layout(free_bytes(self.device), self.memory_budget, self.batch_size, self.patch_size,
                             [e.dim for e in self._on_device])
            log.debug("encoder ring on %s: %d slots (budget %.1f GB)", self.device, plan.slots,
                      plan.budget_bytes / 1e9)
            self._ring = EncoderCudaStreams(self._on_device, device_ops(self.device), batch_size=self.batch_size,
                                        slots=plan.slots)

    def submit(self, pixels: Any, names: frozenset[str] | None) -> _Ticket:  # type: ignore[override]
        """Queue the batch on every device encoder's stream; run the host encoders on a host copy now."""
        wanted = {e.name for e in self.encoders if names is None or e.name in names}
        device = frozenset(e.name for e in self._on_device if e.name in wanted)
        ring = self._ring.submit(pixels, device) if device and self._ring is not None else None
        host_names = [e for e in self._on_host if e.name in wanted]
        host = {e.name: e.encode(to_host(pixels)) for e in host_names} if host_names else {}
        return _Ticket(ring, Encoded(host, nonfinite_rows(host)))

    def collect(self, ticket: object) -> Encoded:
        """Wait for the device encoders of a submitted batch (events, not a device-wide synchronize)."""
        assert isinstance(ticket, _Ticket)
        if ticket.ring is None:
            return ticket.host
        ring = self._ring.collect(ticket.ring)
        return Encoded({**ticket.host.features, **ring.features}, {**ticket.host.nonfinite, **ring.nonfinite})

    def close(self) -> None:
        """Drop the ring and free every model's memory, even when one close fails."""
        if self._ring is not None:
            self._ring.close()
            self._ring = None
        super().close()
