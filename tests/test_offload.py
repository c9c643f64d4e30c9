"""Where the layers go (runtime/devices/offload.py): the fit arithmetic, with made-up GPUs and model sizes."""

from __future__ import annotations

import pytest

from runtime.cache_plan import CachePlan
from runtime.devices.gpu import GpuDevice
from runtime.devices.offload import MARGIN_BYTES, ModelFacts, OffloadRequest, after_fallback, plan
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
    assert "Vulkan0 Test GPU + Vulkan1 Test GPU" in two.note


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
