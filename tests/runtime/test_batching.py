"""Bounded batch shapes, padding, model instances and warm-up: the batcher and the model in-process, with the
real ONNX Runtime backend behind a proxy that records what reaches it."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest
from conftest import mlp_reference
from edgeloop_runtime.backends import KIND_CPU, KIND_GPU, LoadOptions, backend_for
from edgeloop_runtime.batcher import Batcher, trim_or_pad
from edgeloop_runtime.metrics import Metrics
from edgeloop_runtime.model import Model, allowed_batch_sizes, cgroup_cpus, default_instances
from edgeloop_runtime.protocol.tensors import Tensor


class Recording:
    """A session that records the shapes it runs and how many runs overlap, and passes them on."""

    def __init__(self, session) -> None:
        self.session = session
        self.inputs, self.outputs = session.inputs, session.outputs
        self.providers, self.device_kind = session.providers, session.device_kind
        self.shapes: list[tuple[int, ...]] = []
        self.running = 0
        self.most_running = 0
        self.lock = threading.Lock()

    def set_instances(self, count: int) -> None:
        self.session.set_instances(count)

    def strings(self, name, array):
        return self.session.strings(name, array)

    def run(self, feeds):
        with self.lock:
            self.shapes.append(next(iter(feeds.values())).shape)
            self.running += 1
            self.most_running = max(self.most_running, self.running)
        try:
            return self.session.run(feeds)
        finally:
            with self.lock:
                self.running -= 1


def load(path, *, instances=1, max_batch_size=8, batch_sizes=None, model_format="onnx") -> tuple[Model, Recording]:
    backend = backend_for(model_format)
    session = Recording(backend.load(path.read_bytes(), LoadOptions()))
    session.set_instances(instances)
    sizes = allowed_batch_sizes(max_batch_size, batch_sizes)
    model = Model(backend, session, name="m", version="1", sha256="0" * 64, max_batch_size=max_batch_size,
                  batch_sizes=sizes, instances=instances)  # fmt: skip
    return model, session


def test_default_batch_sizes_are_powers_of_two_and_the_maximum():
    assert allowed_batch_sizes(8) == (1, 2, 4, 8)
    assert allowed_batch_sizes(12) == (1, 2, 4, 8, 12)
    assert allowed_batch_sizes(1) == (1,)
    assert allowed_batch_sizes(0) == ()
    assert allowed_batch_sizes(16, [16, 1, 4, 4]) == (1, 4, 16)
    with pytest.raises(ValueError, match="include --max-batch-size"):
        allowed_batch_sizes(16, [1, 4, 8])
    with pytest.raises(ValueError, match=r"within 1\.\.16"):
        allowed_batch_sizes(16, [0, 16])


@pytest.mark.parametrize(
    ("sizes", "allowed", "expected"),
    [
        ([1, 1, 1, 1], (1, 2, 4, 8), (4, 4)),  # an allowed size: as it is
        ([1] * 5, (1, 2, 4, 8), (4, 4)),  # 4 is nearer than 8: the fifth request waits for the next batch
        ([1] * 3, (1, 2, 4, 8), (2, 2)),  # a tie: no padding computed
        ([1] * 7, (1, 2, 4, 8), (7, 8)),  # 8 is nearer: padded
        ([3], (1, 2, 4, 8), (1, 4)),  # one request cannot be cut: padded
        ([3, 2], (1, 2, 4, 8), (2, 8)),  # no prefix adds up to 4: padded
        ([29], (1, 2, 4, 8, 16, 32), (1, 32)),
        ([1, 1, 1], (), (3, 3)),  # no batching: nothing to do
    ],
)
def test_a_batch_is_trimmed_to_the_nearer_allowed_size_or_padded(sizes, allowed, expected):
    assert trim_or_pad(sizes, allowed) == expected


@pytest.mark.parametrize("model_format", ["onnx", "tflite"])
def test_a_burst_of_odd_sized_concurrent_requests_reaches_the_backend_in_allowed_shapes_only(
    model_format, mlp_path, tflite_mlp_path
):
    path = mlp_path if model_format == "onnx" else tflite_mlp_path
    model, session = load(path, instances=2, max_batch_size=8, model_format=model_format)
    rng = np.random.default_rng(1)
    requests = [rng.random((int(rng.integers(1, 9)), 64), dtype=np.float32) for _ in range(300)]

    async def burst():
        batcher = Batcher(model, Metrics("m", "1", "0", ["CPU"]), max_queue=1000, window_us=2000)
        batcher.start()
        try:
            futures = [batcher.submit(*model.check([Tensor("input", "FP32", x.shape, x)])) for x in requests]
            return await asyncio.gather(*futures)
        finally:
            await batcher.stop()

    results = asyncio.run(burst())
    for x, (outputs, _) in zip(requests, results, strict=True):
        logits, label = mlp_reference(mlp_path, x)
        np.testing.assert_allclose(outputs["logits"], logits, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(outputs["label"], label)
    batch_dims = {shape[0] for shape in session.shapes}
    assert batch_dims <= {1, 2, 4, 8}, sorted(batch_dims)
    assert len(session.shapes) < len(requests), "requests were batched"


def test_model_instances_run_batches_at_once(slow_path):
    model, session = load(slow_path, instances=2, max_batch_size=1)  # a batch per request, a few ms each
    x = np.ones((1, 1024), np.float32)

    async def burst():
        batcher = Batcher(model, Metrics("m", "1", "0", ["CPU"]), max_queue=100, window_us=0)
        batcher.start()
        try:
            return await asyncio.gather(*(batcher.submit(*model.check([Tensor("x", "FP32", x.shape, x)]))
                                          for _ in range(16)))  # fmt: skip
        finally:
            await batcher.stop()

    for outputs, _ in asyncio.run(burst()):
        np.testing.assert_array_equal(outputs["y"], x)
    assert session.most_running == 2, "both instances ran batches at once, never more"


def test_warm_up_runs_every_allowed_batch_size_once(mlp_path):
    model, session = load(mlp_path, max_batch_size=16, batch_sizes=[1, 3, 16])
    assert model.warm_up() > 0
    assert [shape[0] for shape in session.shapes] == [1, 3, 16]
    assert model.warmup_seconds is not None


def test_without_batching_the_warm_up_runs_once_and_nothing_is_padded(mlp_path):
    model, session = load(mlp_path, max_batch_size=0)
    model.warm_up()
    assert session.shapes == [(1, 64)]
    assert model.batch_sizes == ()


def test_default_instances_follow_the_cpu_limit_and_threads():
    assert default_instances(KIND_CPU, threads=1, cpus=2) == 2
    assert default_instances(KIND_CPU, threads=2, cpus=4) == 2
    assert default_instances(KIND_CPU, threads=4, cpus=2) == 1
    assert default_instances(KIND_CPU, threads=1, cpus=0.5) == 1
    assert default_instances(KIND_CPU, threads=0, cpus=16) == 1  # the backend takes every core itself
    assert default_instances(KIND_GPU, threads=1, cpus=16) == 2


def test_the_cpu_limit_is_read_from_cgroup_v2_and_v1(tmp_path):
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert cgroup_cpus(tmp_path) == 1.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpus(tmp_path) is None
    (tmp_path / "cpu.max").unlink()
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("200000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_cpus(tmp_path) == 2
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert cgroup_cpus(tmp_path) is None
