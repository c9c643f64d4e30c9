"""What the CPU can do, asked of the CPU itself: small pure decoders, one small probe per OS.

On x86-64 the features come from the CPUID instruction, not from /proc/cpuinfo: the kernel's
list describes the host, which is wrong under emulation (qemu-user passes it through) and in some
containers. Python has no CPUID, and the packages that offer it either shell out or read
/proc/cpuinfo, so a 30-byte routine is run here through ctypes.
"""

from __future__ import annotations

import ctypes
import mmap
import platform
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

Cpuid = Callable[[int, int], tuple[int, int, int, int]]  # (leaf, subleaf) -> eax, ebx, ecx, edx

_REGISTERS = {"eax": 0, "ebx": 1, "ecx": 2, "edx": 3}
# (label, leaf, subleaf, register, bit): the Intel SDM's CPUID bits for the features llama.cpp uses.
X86_FEATURE_BITS = [
    ("SSE4.2", 1, 0, "ecx", 20),
    ("AVX", 1, 0, "ecx", 28),
    ("F16C", 1, 0, "ecx", 29),
    ("FMA", 1, 0, "ecx", 12),
    ("AVX2", 7, 0, "ebx", 5),
    ("AVX-VNNI", 7, 1, "eax", 4),
    ("AVX-512F", 7, 0, "ebx", 16),
    ("AVX-512BW", 7, 0, "ebx", 30),
    ("AVX-512-VNNI", 7, 0, "ecx", 11),
    ("AVX-512-BF16", 7, 1, "eax", 5),
    ("AMX-INT8", 7, 0, "edx", 25),
]
# /proc/cpuinfo "Features" on Linux ARM64, and macOS sysctl keys, for the features llama.cpp uses.
ARM_PROC_FEATURES = {"asimd": "NEON", "asimddp": "DOTPROD", "i8mm": "I8MM", "sve": "SVE", "sve2": "SVE2", "sme": "SME"}
ARM_SYSCTL_FEATURES = {
    "hw.optional.AdvSIMD": "NEON",
    "hw.optional.arm.FEAT_DotProd": "DOTPROD",
    "hw.optional.arm.FEAT_I8MM": "I8MM",
    "hw.optional.arm.FEAT_SME": "SME",
}


@dataclass(frozen=True)
class CpuInfo:
    name: str
    features: tuple[str, ...]
    model_id: str = ""  # x86-64: CPUID leaf 1's family/model/stepping word, which tells steppings apart

    @property
    def signature(self) -> str:
        """What tells this CPU apart from others for the kernel self-test's cache: model and microcode."""
        return f"{self.name} [{self.model_id}] {' '.join(self.features)} microcode {_microcode()}"


def decode_x86(cpuid: Cpuid) -> CpuInfo:
    """Brand string and notable features from a CPUID function (the real one, or a fake in tests)."""
    max_leaf = cpuid(0, 0)[0]
    max_subleaf_7 = cpuid(7, 0)[0] if max_leaf >= 7 else -1
    features = []
    for label, leaf, subleaf, register, bit in X86_FEATURE_BITS:
        if leaf > max_leaf or (leaf == 7 and subleaf > max_subleaf_7):
            continue
        if cpuid(leaf, subleaf)[_REGISTERS[register]] >> bit & 1:
            features.append(label)
    name = ""
    if cpuid(0x80000000, 0)[0] >= 0x80000004:
        words = [word for leaf in (0x80000002, 0x80000003, 0x80000004) for word in cpuid(leaf, 0)]
        name = b"".join(w.to_bytes(4, "little") for w in words).split(b"\0")[0].decode("ascii", "replace").strip()
    return CpuInfo(name=name or "unknown x86-64 CPU", features=tuple(features), model_id=f"{cpuid(1, 0)[0]:#x}")


def parse_proc_cpuinfo(text: str) -> CpuInfo:
    """CPU name and ARM features from Linux's /proc/cpuinfo (first CPU only)."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    flags = set(fields.get("Features", "").split())
    name = fields.get("model name") or fields.get("Hardware") or f"CPU part {fields.get('CPU part', '?')}"
    return CpuInfo(name=name, features=tuple(label for flag, label in ARM_PROC_FEATURES.items() if flag in flags))


def parse_sysctl(values: dict[str, str]) -> CpuInfo:
    """CPU name and ARM features from macOS `sysctl` key/value pairs."""
    name = values.get("machdep.cpu.brand_string") or "Apple CPU"
    return CpuInfo(name=name, features=tuple(label for key, label in ARM_SYSCTL_FEATURES.items() if values.get(key) == "1"))


def cpu_info() -> CpuInfo:
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64"):
        probe = _native_cpuid()
        if probe is not None:
            return decode_x86(probe)
    elif sys.platform == "darwin":
        return parse_sysctl(_sysctl([*ARM_SYSCTL_FEATURES, "machdep.cpu.brand_string"]))
    elif Path("/proc/cpuinfo").exists():
        return parse_proc_cpuinfo(Path("/proc/cpuinfo").read_text())
    return CpuInfo(name=platform.processor() or machine, features=())


def _microcode() -> str:
    """The CPU's microcode revision, where Linux tells it (the first CPU's "microcode" line)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("microcode"):
                    return line.partition(":")[2].strip()
                if not line.strip():
                    break
    except OSError:
        pass
    return "unknown"


def _sysctl(keys: list[str]) -> dict[str, str]:
    result = subprocess.run(["sysctl", *keys], capture_output=True, text=True)
    return {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in result.stdout.splitlines())}


# push rbx; mov r8, rdx; mov eax, edi; mov ecx, esi; cpuid;
# mov [r8], eax; mov [r8+4], ebx; mov [r8+8], ecx; mov [r8+12], edx; pop rbx; ret
# (System V calling convention: leaf in edi, subleaf in esi, output pointer in rdx.)
_CPUID_SYSV = bytes.fromhex("53 4989d0 89f8 89f1 0fa2 418900 41895804 41894808 4189500c 5b c3")
# push rbx; mov eax, ecx; mov ecx, edx; cpuid; the same stores; pop rbx; ret
# (Windows x64 calling convention: leaf in ecx, subleaf in edx, output pointer already in r8.)
_CPUID_WIN64 = bytes.fromhex("53 89c8 89d1 0fa2 418900 41895804 41894808 4189500c 5b c3")
_keep_alive: list[object] = []


def executable_copy(code: bytes) -> int | None:
    """The address of a copy of `code` in memory that may run, or None where the OS refuses such memory."""
    if sys.platform == "win32":
        kernel32 = ctypes.WinDLL("kernel32")
        kernel32.VirtualAlloc.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint32, ctypes.c_uint32]
        kernel32.VirtualAlloc.restype = ctypes.c_void_p
        address = kernel32.VirtualAlloc(None, len(code), 0x3000, 0x40)  # MEM_COMMIT | MEM_RESERVE, PAGE_EXECUTE_READWRITE
        if not address:
            return None
        ctypes.memmove(address, code, len(code))
        return address
    try:
        page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    except (OSError, PermissionError):
        return None  # a hardened kernel may refuse executable memory
    page.write(code)
    _keep_alive.append(page)
    return ctypes.addressof(ctypes.c_char.from_buffer(page))


def _native_cpuid() -> Cpuid | None:
    address = executable_copy(_CPUID_WIN64 if sys.platform == "win32" else _CPUID_SYSV)
    if address is None:
        return None
    function = ctypes.CFUNCTYPE(None, ctypes.c_uint32, ctypes.c_uint32, ctypes.POINTER(ctypes.c_uint32))(address)

    def cpuid(leaf: int, subleaf: int) -> tuple[int, int, int, int]:
        out = (ctypes.c_uint32 * 4)()
        function(leaf, subleaf, out)
        return out[0], out[1], out[2], out[3]

    return cpuid
