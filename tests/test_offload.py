"""Where the layers go (runtime/devices/offload.py): the fit arithmetic, with made-up GPUs and model sizes."""

from __future__ import annotations

import pytest

from runtime.cache_plan import CachePlan
from runtime.devices.gpu import GpuDevice
from runtime.devices.offload import MARGIN_BYTES, ModelFacts, OffloadRequest, after_fallback, layers_per_device, plan
from runtime.errors import BackendError

GIB = 1 << 30
# A 7-8B-class model at Q4_K_M: 28 layers, 4.4 GiB of weights, 56 KiB of F16 cache per token.
SEVEN_B = ModelFacts(n_layer=28, weights_bytes=int(4.4 * GIB), kv_bytes_per_token=56 * 1024, n_vocab=152064, n_embd=3584, n_ctx_train=131072)


SHARED = CachePlan(16384, 4, shared=True)  # 16,384 tokens shared by 4 slots: 0.9 GiB of cache


def ask(cache: CachePlan = SHARED, **kwargs: object) -> OffloadRequest:
    return OffloadRequest(cache=cache, **kwargs)  # type: ignore[arg-type]


def gpu(free_gib: float, name: str = "Vulkan0", index: int = 1) -> GpuDevice:
    return GpuDevice("vulkan", index, name, "Test GPU", int(free_gib * GIB), int(free_gib * GIB))


def test_every_layer_when_everything_fits() -> None:
    placed = plan([gpu(80)], SEVEN_B, ask())
    assert (placed.layers, placed.total_layers, placed.cache) == (29, 29, SHARED)
    assert placed.whole_model_on_gpu
    assert placed.note == "Vulkan0 Test GPU: 29/29 layers"


def test_a_shorter_default_context_before_fewer_layers() -> None:
    # 6.4 GiB less the 1 GiB margin, 4.4 GiB of weights and 0.32 GiB of compute buffers leave 0.68 GiB:
    # 12,781 tokens of cache at 56 KiB each (12,544 in steps of 256), not 32,768.
    placed = plan([gpu(6.4)], SEVEN_B, ask(CachePlan(32768, 4, shared=True)))
    assert placed.whole_model_on_gpu
    assert placed.cache == CachePlan(12544, 4, shared=True)
    assert "29/29 layers, context cut to 12544 tokens to keep it whole" in placed.note


def test_the_context_is_not_cut_below_4096_tokens_and_the_layers_split_beside_that() -> None:
    placed = plan([gpu(5.9)], SEVEN_B, ask(CachePlan(32768, 4, shared=True)))
    assert 0 < placed.layers < placed.total_layers and placed.cache == CachePlan(4096, 4, shared=True)
    kept = plan([gpu(5.9)], SEVEN_B, ask(CachePlan(32768, 4, shared=True), flexible=False))  # -c 32768 given
    assert kept.cache == CachePlan(32768, 4, shared=True) and kept.layers < placed.layers


def test_fewer_slots_before_fewer_layers_with_a_part_for_each() -> None:
    placed = plan([gpu(6.4)], SEVEN_B, ask(CachePlan(16384, 4, shared=False)))
    assert placed.whole_model_on_gpu
    assert placed.cache == CachePlan(12288, 3, shared=False)
    assert "3 slots to keep it whole" in placed.note


def test_an_asked_for_cache_is_kept_and_layers_shrink() -> None:
    placed = plan([gpu(4)], SEVEN_B, ask(flexible=False))
    assert 0 < placed.layers < placed.total_layers
    assert placed.cache == SHARED
    assert "the rest on the CPU" in placed.note


def test_a_gpu_too_small_for_one_layer_means_the_cpu() -> None:
    placed = plan([gpu(MARGIN_BYTES / GIB + 0.1)], SEVEN_B, ask())
    assert placed.layers == 0 and not placed.gpus
    assert "running on the CPU" in placed.note


def test_several_gpus_add_their_free_memory() -> None:
    one = plan([gpu(3.5)], SEVEN_B, ask())
    two = plan([gpu(3.5), gpu(3.5, "Vulkan1", 2)], SEVEN_B, ask())
    assert not one.whole_model_on_gpu and two.whole_model_on_gpu
    assert two.note.startswith("Vulkan0 Test GPU 15 layers + Vulkan1 Test GPU 14 layers: 29/29 layers")
    assert two.split == (2.5 * GIB, 2.5 * GIB)  # by free memory past the margin, handed to llama.cpp as tensor_split


def worker(free_gib: float, port: int, index: int) -> GpuDevice:
    return GpuDevice("rpc", index, f"RPC{index - 3}", f"127.0.0.1:{port}", int(free_gib * GIB), int(free_gib * GIB), endpoint=f"127.0.0.1:{port}")


def test_rpc_workers_take_layers_by_free_memory_beside_this_machines_gpu() -> None:
    """Workers first, as llama.cpp orders them; a worker keeps a tenth of what it offers free, at most 1 GiB."""
    placed = plan([worker(4, 50052, 3), worker(2, 50053, 4), gpu(3.5)], SEVEN_B, ask())
    assert placed.whole_model_on_gpu
    assert placed.split == pytest.approx((3.6 * GIB, 1.8 * GIB, 2.5 * GIB))
    assert placed.note == "RPC0 (127.0.0.1:50052) 14 layers + RPC1 (127.0.0.1:50053) 6 layers + Vulkan0 Test GPU 9 layers: 29/29 layers"


def test_layers_per_device_follows_llama_cpps_rule() -> None:
    # llama.cpp gives offloaded layer i to the first device whose cumulative share exceeds i / layers.
    assert layers_per_device((1.0, 1.0), 2, 31) == [16, 15]
    assert layers_per_device((3.0, 1.0), 2, 8) == [6, 2]
    assert layers_per_device((), 1, 5) == [5]
    assert layers_per_device((0.0, 1.0), 2, 4) == [0, 4]
    assert layers_per_device((0.5, 0.3, 0.1, 0.5), 4, 56) == [20, 12, 4, 20]  # float32, as llama.cpp: not 20, 13, 3, 20


def test_tensor_split_overrides_and_must_name_each_device() -> None:
    devices = [worker(4, 50052, 3), gpu(80)]
    placed = plan(devices, SEVEN_B, ask(split=(1.0, 3.0)))
    assert placed.split == (1.0, 3.0) and "RPC0 (127.0.0.1:50052) 8 layers + Vulkan0 Test GPU 21 layers" in placed.note
    with pytest.raises(BackendError, match=r"--tensor-split 1: give one share, not negative, for each of the 2 devices in this order: RPC0 \(127.0.0.1:50052\), Vulkan0 Test GPU"):
        plan(devices, SEVEN_B, ask(split=(1.0,)))


def test_gpu_device_leaves_the_rpc_workers_in() -> None:
    placed = plan([worker(4, 50052, 3), gpu(80), gpu(80, "Vulkan1", 2)], SEVEN_B, ask(device="Vulkan1"))
    assert [g.name for g in placed.gpus] == ["RPC0", "Vulkan1"]


@pytest.mark.parametrize(
    ("request_", "layers", "note"),
    [
        (ask(layers=0), 0, "--gpu-layers 0"),
        (ask(layers=12), 12, "12/29 layers (--gpu-layers)"),
        (ask(layers=999), 29, "29/29 layers (--gpu-layers)"),
    ],
)
def test_the_command_line_overrides(request_: OffloadRequest, layers: int, note: str) -> None:
    placed = plan([gpu(80)], SEVEN_B, request_)
    assert placed.layers == layers
    assert note in placed.note


def test_no_gpu() -> None:
    placed = plan([], SEVEN_B, ask())
    assert placed.layers == 0 and "no usable GPU" in placed.note


def test_gpu_device_picks_one_and_an_unknown_one_is_refused() -> None:
    placed = plan([gpu(80), gpu(80, "Vulkan1", 2)], SEVEN_B, ask(device="Vulkan1"))
    assert [g.name for g in placed.gpus] == ["Vulkan1"]
    with pytest.raises(BackendError, match="--gpu-device CUDA3: no such GPU here; choose one of: Vulkan0, Vulkan1"):
        plan([gpu(80), gpu(80, "Vulkan1", 2)], SEVEN_B, ask(device="CUDA3"))


def test_after_an_out_of_memory_fallback() -> None:
    planned = plan([gpu(80)], SEVEN_B, ask())
    assert "14/29 layers (fewer than planned" in after_fallback(planned, 14).note
    assert not after_fallback(planned, 0).gpus
