"""Encoder streams: event ordering under simulated CUDA streams, the pinned ring, OOM halving, back-pressure."""

from __future__ import annotations

import logging
import threading

import numpy as np
import pytest
import torch
import torch.nn as nn

from atlaspatch_stream.backends.cuda_streams import (
    EncoderCudaStreams,
    EncoderOutOfMemory,
    InlineOps,
    Ticket,
    device_ops,
    ring_layout,
    size_for_device,
)
from atlaspatch_stream.backends.encoders.registry import get_spec
from atlaspatch_stream.backends.encoders.runtime import TorchEncoder
from atlaspatch_stream.backends.encoders.spec import EncoderSpec, Preprocess
from atlaspatch_stream.config import load_config
from atlaspatch_stream.items import Encoded
from atlaspatch_stream.testing.streams import SimulatedOps

P = 24  # patch edge: small, so many batches run fast


def tiny_spec() -> EncoderSpec:
    """A real (tiny) conv encoder: normalise, conv, pool. Seeded weights."""

    def build() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())

    return EncoderSpec(name="tiny", dim=6, build=build,
                       preprocess=Preprocess(resize=None, crop=None, mean=(0.5,) * 3, std=(0.25,) * 3))


@pytest.fixture(scope="module")
def encoders() -> list[TorchEncoder]:
    """The tiny conv encoder and color_stats, warmed up on CPU."""
    encs = [TorchEncoder(tiny_spec(), device="cpu"), TorchEncoder(get_spec("color_stats"), device="cpu")]
    for e in encs:
        e.warm_up()
    return encs


def batches(n: int, seed: int, most: int = 8) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (int(rng.integers(1, most + 1)), P, P, 3), dtype=np.uint8) for _ in range(n)]


def run_pipelined(runner: EncoderCudaStreams, inputs: list[np.ndarray]) -> list[dict[str, np.ndarray]]:
    """Submit ahead as far as the ring allows, collect in order (as an encode stage would)."""
    out: list[dict[str, np.ndarray]] = []
    pending: list[Ticket] = []
    for pixels in inputs:
        if len(pending) == runner.slots:
            out.append(runner.collect(pending.pop(0)).features)
        pending.append(runner.submit(pixels))
    out += [runner.collect(t).features for t in pending]
    return out


def assert_features(got: list[dict[str, np.ndarray]], inputs: list[np.ndarray], encs: list[TorchEncoder]) -> None:
    for feats, pixels in zip(got, inputs, strict=True):
        for enc in encs:
            np.testing.assert_allclose(feats[enc.name], enc.encode(pixels), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("seed", range(6))
def test_features_equal_direct_encoding_under_random_stream_schedules(encoders: list[TorchEncoder],
                                                                      seed: int) -> None:
    """Twelve batches of varying size through a 3-slot ring, two encoders on their own simulated streams whose work
    runs in a seeded random interleaving: every batch's features equal each encoder run on it directly, so the
    events order fill -> forward -> feature copy -> slot reuse under any schedule."""
    ops = SimulatedOps(seed)
    runner = EncoderCudaStreams(encoders, ops, batch_size=8, slots=3)
    inputs = batches(12, seed)
    assert_features(run_pipelined(runner, inputs), inputs, encoders)
    assert {name for _, name in ops.log} >= {"s0", "s1", "s2"}  # input stream and both encoder streams ran work


class ForgetsToWait(EncoderCudaStreams):
    """A runner whose encoder streams do not wait for the slot to be filled (fault injection)."""

    def _run_lane(self, lane, k, rows):  # type: ignore[no-untyped-def]
        self.ops.launch(lane.stream, self._lane_work(lane, k, rows))
        self.ops.record(lane.done[k], lane.stream)


class FreesEarly(EncoderCudaStreams):
    """A runner that gives a slot back before its encoders have finished (fault injection)."""

    def collect(self, ticket):  # type: ignore[no-untyped-def]
        self._free.put(ticket.slot)
        out = {}
        for i in ticket.lanes:
            out[self._lanes[i].encoder.name] = self._features[ticket.slot][i][: ticket.rows].numpy().copy()
        return Encoded(out)


@pytest.mark.parametrize("broken", [ForgetsToWait, FreesEarly])
def test_the_simulation_catches_missing_ordering(encoders: list[TorchEncoder], broken: type) -> None:
    """The same run with a wait left out, or a slot freed before its events: some schedule gives wrong features
    (the simulation is strict enough to catch ordering bugs)."""
    caught = 0
    for seed in range(6):
        runner = broken(encoders, SimulatedOps(seed), batch_size=8, slots=2)
        inputs = batches(8, seed)
        try:
            assert_features(run_pipelined(runner, inputs), inputs, encoders)
        except AssertionError:
            caught += 1
    assert caught > 0


def test_submit_and_collect_from_two_threads(encoders: list[TorchEncoder]) -> None:
    """A submitting thread and a collecting thread share one runner (simulated streams): every batch comes back in
    order with the right features, and the ring's two slots bound how far submission runs ahead."""
    ops = SimulatedOps(11)
    runner = EncoderCudaStreams(encoders, ops, batch_size=8, slots=2)
    inputs = batches(10, 5)
    tickets: list[Ticket] = []
    got: list[dict[str, np.ndarray]] = []
    ahead: list[int] = []
    collecting = [0]  # collects begun: a slot is freed only inside one, so this bounds submission without a race
    cond = threading.Condition()

    def producer() -> None:
        for pixels in inputs:
            t = runner.submit(pixels)
            with cond:
                tickets.append(t)
                ahead.append(len(tickets) - collecting[0])
                cond.notify()

    def consumer() -> None:
        for i in range(len(inputs)):
            with cond:
                cond.wait_for(lambda i=i: len(tickets) > i, timeout=30)
                t = tickets[i]
                collecting[0] += 1
            feats = runner.collect(t).features
            with cond:
                got.append(feats)

    threads = [threading.Thread(target=producer), threading.Thread(target=consumer)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(got) == len(inputs) and max(ahead) <= 2
    assert_features(got, inputs, encoders)


def test_a_full_ring_blocks_submit_until_a_collect(encoders: list[TorchEncoder]) -> None:
    """With both slots in flight a third submit waits; collecting one batch lets it through."""
    runner = EncoderCudaStreams(encoders, InlineOps(), batch_size=4, slots=2)
    first, _second = runner.submit(batches(1, 1, 4)[0]), runner.submit(batches(1, 2, 4)[0])
    entered, done = threading.Event(), threading.Event()

    def third() -> None:
        entered.set()
        runner.submit(batches(1, 3, 4)[0])
        done.set()

    thread = threading.Thread(target=third)
    thread.start()
    assert entered.wait(5) and not done.wait(0.3)
    runner.collect(first)
    assert done.wait(5)
    thread.join(5)


class OomAbove:
    """Wraps an encoder: raises torch.OutOfMemoryError for forwards of more than `limit` rows (fault injection)."""

    def __init__(self, inner: TorchEncoder, limit: int) -> None:
        self.inner, self.limit = inner, limit
        self.name, self.dim, self.device, self.fixed_batch = inner.name, inner.dim, inner.device, False
        self.sizes: list[int] = []

    def encode_device(self, pixels: torch.Tensor) -> torch.Tensor:
        self.sizes.append(int(pixels.shape[0]))
        if pixels.shape[0] > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.inner.encode_device(pixels)


def test_out_of_memory_halves_the_batch_once_then_fails_clearly(encoders: list[TorchEncoder],
                                                                caplog: pytest.LogCaptureFixture) -> None:
    """An encoder that runs out of memory above 4 rows, fed batches of 8: one warning, then forwards of 4 with the
    right features; one that fails even at 4 stops with EncoderOutOfMemory naming it and the batch sizes."""
    tiny = encoders[0]
    flaky = OomAbove(tiny, 4)
    runner = EncoderCudaStreams([flaky], InlineOps(), batch_size=8, slots=2)
    pixels = batches(1, 9, 8)[0]
    pixels = np.concatenate([pixels] * (8 // len(pixels) + 1))[:8]
    with caplog.at_level(logging.WARNING, logger="atlaspatch_stream"):
        feats = run_pipelined(runner, [pixels, pixels])
    assert sum("out of device memory" in r.message for r in caplog.records) == 1
    assert flaky.sizes[0] == 8 and set(flaky.sizes[1:]) == {4}
    np.testing.assert_allclose(feats[1]["tiny"], tiny.encode(pixels), rtol=1e-5, atol=1e-6)
    hopeless = EncoderCudaStreams([OomAbove(tiny, 2)], InlineOps(), batch_size=8, slots=2)
    with pytest.raises(EncoderOutOfMemory, match=r"tiny ran out of device memory at 4 patches.*--feature-batch-size"):
        hopeless.submit(pixels)


class ShapeLog:
    """Wraps an encoder as compiled (fixed_batch) and records the shapes it is given."""

    def __init__(self, inner: TorchEncoder) -> None:
        self.inner, self.name, self.dim, self.device, self.fixed_batch = inner, inner.name, inner.dim, "cpu", True
        self.shapes: list[int] = []

    def encode_device(self, pixels: torch.Tensor) -> torch.Tensor:
        self.shapes.append(int(pixels.shape[0]))
        return self.inner.encode_device(pixels)


def test_fixed_batch_encoders_always_see_full_batches(encoders: list[TorchEncoder]) -> None:
    """A compiled (fixed-shape) encoder gets full 8-row windows even for a 3-row tail; only the real rows return."""
    log = ShapeLog(encoders[0])
    runner = EncoderCudaStreams([log], InlineOps(), batch_size=8, slots=2)
    inputs = [batches(1, 4, 8)[0][:1].repeat(8, 0), batches(1, 5, 3)[0][:3]]
    got = run_pipelined(runner, inputs)
    assert log.shapes == [8, 8] and got[1]["tiny"].shape == (3, 6)
    np.testing.assert_allclose(got[1]["tiny"], encoders[0].encode(inputs[1]), rtol=1e-5, atol=1e-6)


def test_only_the_named_encoders_run(encoders: list[TorchEncoder]) -> None:
    """Rows of a reused slide that need only some encoders: the others neither run nor return features."""
    runner = EncoderCudaStreams(encoders, SimulatedOps(2), batch_size=8, slots=2)
    ticket = runner.submit(batches(1, 6)[0], encoders=frozenset({"color_stats"}))
    assert set(runner.collect(ticket).features) == {"color_stats"}
    assert runner.names == ["tiny", "color_stats"]


def test_device_tensors_stay_on_the_device(encoders: list[TorchEncoder]) -> None:
    """A torch batch on the runner's device is copied into the ring without going through host staging; the
    encoder's device output is on its device; device_ops picks InlineOps off CUDA."""
    ops = device_ops("cpu")
    assert isinstance(ops, InlineOps)
    runner = EncoderCudaStreams(encoders[:1], ops, batch_size=8, slots=2)
    pixels = torch.from_numpy(batches(1, 7)[0])
    out = encoders[0].encode_device(pixels)
    assert out.device == pixels.device and out.dtype == torch.float32
    np.testing.assert_allclose(runner.collect(runner.submit(pixels)).features["tiny"], out.numpy(), rtol=1e-5, atol=1e-6)
    runner.close()


def test_ring_plan_from_the_memory_budget() -> None:
    """Half of 80 GB free for batches of 512 at 256² with two encoders: 4 slots, a 16-deep patch queue, and the
    rest (tens of GB) for the decoded-tile cache; a tiny budget still gets 2 slots and 2 queued batches."""
    plan = ring_layout(80 << 30, 0.5, 512, 256, (1024, 2048))
    assert (plan.slots, plan.patch_queue) == (4, 16) and plan.tile_cache_bytes > 30 << 30
    small = ring_layout(1 << 20, 0.5, 512, 256, (1024,))
    assert (small.slots, small.patch_queue, small.tile_cache_bytes) == (2, 2, 0)


def test_queue_depth_and_decode_batch_from_the_budget_on_cuda() -> None:
    """On a CUDA feature device the patch queue (in reader chunks) and the decode batch come from the budget: a big
    GPU keeps the configured ceilings' decode batch and gets a deep queue; a small one shrinks both. CPU runs keep
    their own sizing (`sized_for_cpu`), and nothing here touches a device (free bytes given)."""
    def config(device: str, budget: float = 0.5):  # noqa: ANN202
        return load_config({"encode": {"device": device, "batch_size": 256, "gpu_memory_budget": budget,
                                       "extractors": ("color_stats",)},
                            "plan": {"patch_size": 224}, "read": {"chunk_patches": 64}}, environ={})

    big = size_for_device(config("cuda:0"), free=120 << 30)
    assert big.queues.patches == 16 * 256 // 64 and big.read.decode_batch == config("cuda:0").read.decode_batch
    small = size_for_device(config("cuda:1", 0.1), free=2 << 30)
    assert 2 <= small.queues.patches < big.queues.patches and 16 <= small.read.decode_batch < big.read.decode_batch
    cpu = config("cpu")
    assert size_for_device(cpu, free=120 << 30) == cpu.sized_for_cpu()
    if not torch.cuda.is_available():  # asked of the device: none here, so sized for the CPU the backends fall back to
        assert size_for_device(config("cuda")) == config("cuda").sized_for_cpu()
        assert size_for_device(config("cuda:1")) == config("cuda:1")  # refused by the backends, with their message
