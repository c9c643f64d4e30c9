"""Where the model's layers go: how many of them, and how many slots, fit the free memory of the GPUs.

llama.cpp's own fitting (common/fit.cpp, llama-server's --fit) is not part of its C API, so the sizes are
worked out here from what the model says of itself (llama.cpp reads it without allocating anything: the
weights' size, the layer count, the cache's bytes per token) and what the GPUs report as free. As llama-server,
a margin of each GPU's memory is left free (its --fit-target, 1 GiB), and every layer goes to the GPU when all
fit, else as many as fit. Before fewer layers, a smaller cache is taken when that keeps the whole model on the
GPU, since a model split with the CPU runs at nearly the CPU's speed: a shorter default context (as
llama-server's --fit, not below its --fit-ctx of 4096 tokens), or with --ctx-per-slot fewer slots.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy

from runtime.devices.gpu import GpuDevice
from runtime.cache_plan import CELL_ROUNDING, MIN_AUTO_CONTEXT, CachePlan
from runtime.errors import BackendError

MARGIN_BYTES = 1 << 30  # left free on each GPU, as llama-server's --fit-target default
MIB = 1 << 20


@dataclass(frozen=True)
class ModelFacts:
    """What the model needs, as llama.cpp reads it from the GGUF without loading the weights."""

    n_layer: int  # repeating layers; llama.cpp counts one more (the output layer) in n_gpu_layers
    weights_bytes: int
    kv_bytes_per_token: int  # keys and values of one token in every layer, in the cache's types
    n_vocab: int
    n_embd: int
    n_ctx_train: int


@dataclass(frozen=True)
class OffloadRequest:
    """The command line's say: --gpu-layers and --gpu-device, and the cache the engine would make."""

    cache: CachePlan
    layers: int | None = None  # None: as many as fit
    device: str | None = None  # a GPU's name (Vulkan0, CUDA0); None: every proven GPU of the best backend
    split: tuple[float, ...] = ()  # --tensor-split: each device's share of the layers; none: by free memory
    ubatch: int = 512  # -ub: the tokens of one compute step, which size the compute buffers
    flexible: bool = True  # whether the cache may shrink to keep the model whole: --ctx-size, or --parallel, not given


@dataclass(frozen=True)
class Offload:
    """The decision: the GPUs used (none: the CPU), how many of the model's layers go on them, and why."""

    gpus: tuple[GpuDevice, ...]
    layers: int  # for llama_model_params.n_gpu_layers (0..n_layer + 1)
    total_layers: int  # n_layer + 1, as llama.cpp counts them
    cache: CachePlan | None  # the cache the engine makes, smaller than asked where that keeps the model on the GPU; None: no GPU, the engine plans it
    note: str  # "Vulkan0 NVIDIA H100: 31/31 layers"
    split: tuple[float, ...] = ()  # each of `gpus`' share of the layers, for llama_model_params.tensor_split

    @property
    def whole_model_on_gpu(self) -> bool:
        return bool(self.gpus) and self.layers >= self.total_layers


def cpu_only(note: str, facts: ModelFacts | None = None) -> Offload:
    return Offload(gpus=(), layers=0, total_layers=(facts.n_layer + 1) if facts else 0, cache=None, note=note)


def plan(gpus: list[GpuDevice], facts: ModelFacts, request: OffloadRequest) -> Offload:
    """Where the layers go, given the proven GPUs (none with --gpu off) and --rpc's workers, and the model."""
    total = facts.n_layer + 1
    if not gpus:
        return cpu_only("no usable GPU: running on the CPU", facts)
    # --gpu-device picks among this machine's GPUs; the workers named with --rpc are always used.
    chosen = [g for g in gpus if g.endpoint or g.name == request.device] if request.device else gpus
    if request.device and not any(g.name == request.device for g in chosen):
        local = [g.name for g in gpus if not g.endpoint]
        raise BackendError(f"--gpu-device {request.device}: no such GPU here; choose one of: {', '.join(local) or 'none (no usable GPU)'}")
    split = _shares(chosen, request.split)
    if request.layers == 0:
        return cpu_only(f"{_names(chosen)} present, --gpu-layers 0: running on the CPU", facts)
    if request.layers is not None:
        layers = min(request.layers, total)
        return _placed(chosen, split, layers, total, request.cache, " (--gpu-layers)")
    free = sum(max(0, g.free_bytes - _margin(g)) for g in chosen)
    cache = request.cache
    if _bytes_needed(facts, total, cache.cells, request.ubatch) <= free:
        return _placed(chosen, split, total, total, cache, "")
    if request.flexible:
        smaller = _smaller_cache(facts, cache, free, request.ubatch)
        if smaller is not None:
            what = f"context cut to {smaller.cells} tokens" if smaller.shared else f"{smaller.parallel} slots"
            return _placed(chosen, split, total, total, smaller, f", {what} to keep it whole")
        cache = _smallest_cache(cache)  # split with the CPU: the most layers on the GPU beside the least cache
    layers = max((n for n in range(total) if _bytes_needed(facts, n, cache.cells, request.ubatch) <= free), default=0)
    need = _bytes_needed(facts, total, cache.cells, request.ubatch)
    if layers == 0:
        return cpu_only(f"{_names(chosen)} has {free // MIB} MiB free, the model needs {need // MIB} MiB even for one layer: running on the CPU", facts)
    return _placed(chosen, split, layers, total, cache, f" (all of them need {need // MIB} MiB, {free // MIB} MiB free; the rest on the CPU)")


def _margin(device: GpuDevice) -> int:
    """What is left free on a device: llama-server's 1 GiB on a GPU; on an RPC worker a tenth of what it offers, up
    to that (its owner caps what it offers with --rpc-mem)."""
    return min(MARGIN_BYTES, device.total_bytes // 10) if device.endpoint else MARGIN_BYTES


def _shares(devices: list[GpuDevice], split: tuple[float, ...]) -> tuple[float, ...]:
    """Each device's share of the layers: --tensor-split's where given, else in proportion to free memory past the
    margin (llama.cpp's own default is free memory). None for a single device."""
    if split:
        if len(split) != len(devices) or any(share < 0 for share in split) or not sum(split):
            raise BackendError(
                f"--tensor-split {','.join(f'{x:g}' for x in split)}: give one share, not negative, for each of the "
                f"{len(devices)} devices in this order: {', '.join(_name(g) for g in devices)}"
            )
        return split
    if len(devices) == 1:
        return ()
    shares = tuple(float(max(0, g.free_bytes - _margin(g))) for g in devices)
    return shares if sum(shares) else tuple(1.0 for _ in devices)


def layers_per_device(split: tuple[float, ...], devices: int, layers: int) -> list[int]:
    """How many of the offloaded `layers` each device gets, as llama.cpp assigns them (llama-model.cpp: each layer
    in order to the first device whose cumulative share exceeds the layer's position, all of it in float32)."""
    shares = numpy.array(split or (1.0,) * devices, dtype=numpy.float32)
    bounds = numpy.cumsum(shares, dtype=numpy.float32) / numpy.float32(shares.sum(dtype=numpy.float32))
    counts = [0] * devices
    for i in range(layers):
        position = numpy.float32(i) / numpy.float32(layers)
        counts[min(int(numpy.searchsorted(bounds, position, side="right")), devices - 1)] += 1
    return counts


def _placed(chosen: list[GpuDevice], split: tuple[float, ...], layers: int, total: int, cache: CachePlan, why: str) -> Offload:
    if len(chosen) == 1:
        where = _names(chosen)
    else:
        counts = layers_per_device(split, len(chosen), layers)
        where = " + ".join(f"{_name(g)} {n} layer{'s' * (n != 1)}" for g, n in zip(chosen, counts))
    return Offload(tuple(chosen), layers, total, cache, f"{where}: {layers}/{total} layers{why}", split)


def _smallest_cache(cache: CachePlan) -> CachePlan:
    """The least a flexible cache may shrink to: MIN_AUTO_CONTEXT shared tokens, or one slot's part."""
    if cache.shared:
        return CachePlan(min(cache.cells, MIN_AUTO_CONTEXT), cache.parallel, shared=True)
    return CachePlan(cache.per_request, 1, shared=False)


def _smaller_cache(facts: ModelFacts, cache: CachePlan, free: int, ubatch: int) -> CachePlan | None:
    """The largest cache, no smaller than _smallest_cache, with which every layer fits `free` bytes; None if none
    does. A shared cache keeps its slots and gets fewer cells (in steps of CELL_ROUNDING); parts per slot keep their
    size and there are fewer of them."""
    total = facts.n_layer + 1
    if cache.shared:
        floor = _smallest_cache(cache).cells
        sizes = [*range((cache.cells - 1) // CELL_ROUNDING * CELL_ROUNDING, floor, -CELL_ROUNDING), floor]
        fits = next((n for n in sizes if n < cache.cells and _bytes_needed(facts, total, n, ubatch) <= free), None)
        return None if fits is None else CachePlan(fits, cache.parallel, shared=True)
    part = cache.per_request
    slots = next((n for n in range(cache.parallel - 1, 0, -1) if _bytes_needed(facts, total, part * n, ubatch) <= free), None)
    return None if slots is None else CachePlan(part * slots, slots, shared=False)


def after_fallback(planned: Offload, layers: int) -> Offload:
    """The placement once the engine had to put fewer layers on the GPU than planned (it ran out of memory)."""
    if layers == 0:
        return Offload((), 0, planned.total_layers, planned.cache, f"{_names(planned.gpus)} ran out of memory even for one layer: running on the CPU")
    return Offload(
        planned.gpus, layers, planned.total_layers, planned.cache,
        f"{_names(planned.gpus)}: {layers}/{planned.total_layers} layers (fewer than planned: it ran out of memory)", planned.split,
    )


def _bytes_needed(facts: ModelFacts, layers: int, cells: int, ubatch: int) -> int:
    """GPU memory for `layers` of the model (llama.cpp's count), their share of a cache of `cells` tokens, and the
    compute buffers for steps of `ubatch` tokens."""
    if layers == 0:
        return 0
    total = facts.n_layer + 1
    weights = facts.weights_bytes * layers // total
    cache = facts.kv_bytes_per_token * min(layers, facts.n_layer) // max(facts.n_layer, 1) * cells
    # The largest compute buffer is the logits of one ubatch and its activations.
    compute = ubatch * (facts.n_vocab + 4 * facts.n_embd) * 4
    return weights + cache + compute


def _names(gpus: list[GpuDevice] | tuple[GpuDevice, ...]) -> str:
    return " + ".join(_name(g) for g in gpus)


def _name(device: GpuDevice) -> str:
    """'Vulkan0 NVIDIA H100', or a worker's 'RPC0 (192.168.1.20:50052)'."""
    return f"{device.name} ({device.endpoint})" if device.endpoint else f"{device.name} {device.description}"
