"""CPU feature decoding, variant choice and GPU offload choice: pure functions with fake inputs."""

from __future__ import annotations

import platform
import shutil
from pathlib import Path

import pytest

from runtime import packaged
from runtime.devices import cpu as backends
from runtime.devices.cpu import VariantScore, forced_variant, ranked
from runtime.devices.ggml import module_file_name
from runtime.devices.cpu_features import X86_FEATURE_BITS, cpu_info, decode_x86, parse_proc_cpuinfo, parse_sysctl
from runtime.errors import BackendError

_REG = {"eax": 0, "ebx": 1, "ecx": 2, "edx": 3}


def fake_cpuid(features: set[str], brand: str = "Fake CPU", max_leaf: int = 0xD):
    """A CPUID function reporting exactly `features` (by this module's labels)."""
    regs: dict[tuple[int, int], list[int]] = {}
    for label, leaf, subleaf, register, bit in X86_FEATURE_BITS:
        if label in features:
            regs.setdefault((leaf, subleaf), [0, 0, 0, 0])[_REG[register]] |= 1 << bit
    text = brand.encode().ljust(48, b"\0")
    words = [int.from_bytes(text[i : i + 4], "little") for i in range(0, 48, 4)]

    def cpuid(leaf: int, subleaf: int) -> tuple[int, int, int, int]:
        if leaf == 0:
            return (max_leaf, 0, 0, 0)
        if leaf == 7 and subleaf == 0:
            r = regs.get((7, 0), [0, 0, 0, 0])
            return (1, r[1], r[2], r[3])
        if leaf == 0x80000000:
            return (0x80000004, 0, 0, 0)
        if 0x80000002 <= leaf <= 0x80000004:
            i = (leaf - 0x80000002) * 4
            return tuple(words[i : i + 4])
        return tuple(regs.get((leaf, subleaf), [0, 0, 0, 0]))

    return cpuid


@pytest.mark.parametrize(
    "features",
    [
        set(),
        {"SSE4.2"},
        {"SSE4.2", "AVX"},
        {"SSE4.2", "AVX", "F16C", "FMA", "AVX2"},
        {"SSE4.2", "AVX", "F16C", "FMA", "AVX2", "AVX-512F", "AVX-512BW", "AVX-512-VNNI", "AVX-512-BF16"},
        {"SSE4.2", "AVX", "F16C", "FMA", "AVX2", "AVX-VNNI"},
    ],
)
def test_decode_x86(features: set[str]) -> None:
    info = decode_x86(fake_cpuid(features, brand="  Intel(R) Test CPU @ 3.0GHz"))
    assert set(info.features) == features
    assert info.name == "Intel(R) Test CPU @ 3.0GHz"


def test_decode_x86_ignores_leaf_7_on_old_cpus() -> None:
    info = decode_x86(fake_cpuid({"SSE4.2", "AVX2"}, max_leaf=5))
    assert info.features == ("SSE4.2",)


@pytest.mark.skipif(platform.machine() != "x86_64", reason="x86-64 only")
def test_cpuid_agrees_with_the_kernel_here() -> None:
    """Natively (not emulated), CPUID and /proc/cpuinfo describe the same CPU."""
    flags = set(next(l for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("flags")).split(":")[1].split())
    names = {"SSE4.2": "sse4_2", "AVX": "avx", "F16C": "f16c", "FMA": "fma", "AVX2": "avx2", "AVX-VNNI": "avx_vnni",
             "AVX-512F": "avx512f", "AVX-512BW": "avx512bw", "AVX-512-VNNI": "avx512_vnni", "AVX-512-BF16": "avx512_bf16",
             "AMX-INT8": "amx_int8"}
    assert set(cpu_info().features) == {label for label, flag in names.items() if flag in flags}


def test_parse_proc_cpuinfo_arm64() -> None:
    text = "processor\t: 0\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd evtstrm aes asimddp sve i8mm\nCPU part\t: 0xd40\n\nprocessor\t: 1\n"
    info = parse_proc_cpuinfo(text)
    assert info.features == ("NEON", "DOTPROD", "I8MM", "SVE")
    assert info.name == "CPU part 0xd40"


def test_parse_sysctl_apple() -> None:
    info = parse_sysctl({"machdep.cpu.brand_string": "Apple M2", "hw.optional.AdvSIMD": "1",
                         "hw.optional.arm.FEAT_DotProd": "1", "hw.optional.arm.FEAT_I8MM": "1", "hw.optional.arm.FEAT_SME": "0"})
    assert info == type(info)(name="Apple M2", features=("NEON", "DOTPROD", "I8MM"))


SCORES = [VariantScore("x64", Path("x64.so"), 1), VariantScore("sse42", Path("sse42.so"), 5),
          VariantScore("sandybridge", Path("sb.so"), 21), VariantScore("haswell", Path("hw.so"), 0)]


def test_variants_ranked_by_llama_cpp_score_without_the_unrunnable() -> None:
    assert [s.name for s in ranked(SCORES)] == ["sandybridge", "sse42", "x64"]


def test_forced_variant() -> None:
    assert forced_variant(SCORES, "x64").name == "x64"


def test_unknown_variant_lists_the_valid_ones() -> None:
    with pytest.raises(BackendError, match="unknown CPU variant 'avx9'; choose one of: x64, sse42, sandybridge, haswell"):
        forced_variant(SCORES, "avx9")


def test_variant_the_cpu_cannot_run_is_refused() -> None:
    with pytest.raises(BackendError, match="cannot run the 'haswell' kernels.*x64, sse42, sandybridge"):
        forced_variant(SCORES, "haswell")


@pytest.fixture
def variant_copies(tmp_path: Path) -> Path:
    """A private copy of this machine's CPU variant libraries, to damage."""
    for lib in packaged.backend_dir().glob(backends.CPU_VARIANT_GLOB):
        shutil.copy(lib, tmp_path / lib.name)
    return tmp_path


def _best_here(directory: Path) -> str:
    return max((backends._score(p, []), backends.variant_name(p)) for p in directory.glob(backends.CPU_VARIANT_GLOB))[1]


def test_missing_variant_library_warns_and_uses_the_rest(variant_copies: Path) -> None:
    everything = sorted(backends.variant_name(p) for p in variant_copies.glob(backends.CPU_VARIANT_GLOB))
    best = _best_here(variant_copies)
    (variant_copies / module_file_name(f"cpu-{best}")).unlink()
    scores, warnings = backends.variant_scores(variant_copies, expected=everything)
    assert backends.ranked(scores)[0].name != best
    assert any(best in w and "lacks the CPU kernels" in w for w in warnings)


def test_damaged_variant_library_is_skipped_with_a_warning(variant_copies: Path) -> None:
    best = _best_here(variant_copies)
    (variant_copies / module_file_name(f"cpu-{best}")).write_bytes(b"\x7fELF garbage")
    scores, warnings = backends.variant_scores(variant_copies)
    assert backends.ranked(scores)[0].name != best
    assert any("cannot open" in w for w in warnings)


def test_no_variant_libraries(tmp_path: Path) -> None:
    with pytest.raises(BackendError, match="no llama.cpp CPU libraries"):
        backends.variant_scores(tmp_path)
