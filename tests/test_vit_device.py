"""Batches onto the device and the device's settings: the read-ahead order the CUDA copy relies on (driven
with recording fakes, as a GPU would drive it), the plain move on a CPU, TF32 and bf16 autocast; and a
counter of the reads that make the host wait for the device, for the loops' tests."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from vit.device import autocast, copy_ahead, enable_tf32, object_group, prefetch_to_device

CPU = torch.device("cpu")
# What makes the host wait for a device: a value read back (on a GPU each of these synchronises).
HOST_READS = ("item", "tolist", "numpy", "cpu", "__float__", "__int__", "__bool__", "__index__")


def count_host_reads(monkeypatch: pytest.MonkeyPatch) -> Counter:
    """Count every tensor method that reads a value back to the host, from now until the test ends."""
    counts: Counter = Counter()
    for name in HOST_READS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _name=name, _original=original, **kwargs):
            counts[_name] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return counts


def test_the_next_batch_is_copied_before_this_one_is_handed_out_and_each_is_waited_for():
    events: list[tuple[str, int]] = []

    def copy(batch: int) -> int:
        events.append(("copy", batch))
        return batch

    def wait(batch: int) -> int:
        events.append(("wait", batch))
        return batch

    for batch in copy_ahead(range(3), copy, wait):
        events.append(("use", batch))
    assert events == [
        ("copy", 0), ("copy", 1), ("wait", 0), ("use", 0),
        ("copy", 2), ("wait", 1), ("use", 1),
        ("wait", 2), ("use", 2),
    ]  # fmt: skip
    assert list(copy_ahead([], copy, wait)) == []


def test_on_a_cpu_batches_arrive_as_tensors_with_int64_labels_one_read_ahead():
    rng = np.random.default_rng(0)
    host = [(rng.integers(0, 256, (4, 2, 3), dtype=np.uint8), np.arange(4, dtype=np.int32)) for _ in range(3)]
    pulled = []

    def source():
        for index, batch in enumerate(host):
            pulled.append(index)
            yield batch

    served = prefetch_to_device(source(), CPU)
    patches, labels = next(served)
    assert pulled == [0, 1]  # the next batch was read before the first was handed out
    assert patches.device == CPU
    assert patches.dtype == torch.uint8
    assert labels.dtype == torch.int64
    rest = list(served)
    assert len(rest) == 2
    for (got_patches, got_labels), (want_patches, want_labels) in zip(
        [(patches, labels), *rest], host, strict=True
    ):
        np.testing.assert_array_equal(got_patches.numpy(), want_patches)
        np.testing.assert_array_equal(got_labels.numpy(), want_labels)


@pytest.fixture
def precision_settings():
    """The TF32 settings `enable_tf32` writes, set to plain fp32 and put back afterwards: they are global to
    the process."""
    settings = (torch.backends.cuda.matmul, torch.backends.cudnn.conv)
    saved = [setting.fp32_precision for setting in settings]
    for setting in settings:
        setting.fp32_precision = "ieee"
    yield settings
    for setting, value in zip(settings, saved, strict=True):
        setting.fp32_precision = value


def test_tf32_is_turned_on_for_cuda_and_left_alone_elsewhere(precision_settings):
    assert enable_tf32(CPU) is False
    assert [setting.fp32_precision for setting in precision_settings] == ["ieee", "ieee"]
    assert enable_tf32(torch.device("cuda")) is True  # the settings are flags: no CUDA is touched
    assert [setting.fp32_precision for setting in precision_settings] == ["tf32", "tf32"]


def test_autocast_computes_in_bf16_only_when_asked():
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    with autocast(CPU, bf16=True):
        assert (a @ b).dtype == torch.bfloat16
    with autocast(CPU, bf16=False):
        assert (a @ b).dtype == torch.float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_the_side_stream_copy_delivers_every_batch_intact():
    cuda = torch.device("cuda")
    rng = np.random.default_rng(0)
    host = [(rng.integers(0, 256, (64, 196, 768), dtype=np.uint8), rng.integers(0, 10, 64)) for _ in range(8)]
    for (patches, labels), (want_patches, want_labels) in zip(
        prefetch_to_device(host, cuda), host, strict=True
    ):
        busy = patches.float() @ torch.ones(768, 768, device=cuda)  # compute queued while the next copies
        assert patches.device.type == "cuda"
        assert labels.dtype == torch.int64
        assert busy.shape == (64, 196, 768)
        np.testing.assert_array_equal(patches.cpu().numpy(), want_patches)
        np.testing.assert_array_equal(labels.cpu().numpy(), want_labels)


def test_objects_travel_in_a_gloo_group_beside_nccl_and_in_the_default_group_otherwise(one_rank_group):
    """Both answers on a CPU: under NCCL a gloo group of every rank (built here beside the one-rank gloo
    group, as a GPU worker builds it beside NCCL), else the default group itself."""
    assert object_group("gloo") is None
    group = object_group("nccl")
    assert torch.distributed.get_backend(group) == "gloo"
    assert torch.distributed.get_world_size(group) == torch.distributed.get_world_size()
    holder = ["mark"]
    torch.distributed.broadcast_object_list(holder, src=0, group=group)
    assert holder == ["mark"]
