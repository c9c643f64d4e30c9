"""What can compute here and how well: the CPU's kernels, the GPU backends, and the self-test that proves either.

- `ggml.py`: ggml's backend registry through ctypes (loading a module, listing devices, device lists for llama.cpp)
- `cpu_features.py`: what the CPU says it can do (CPUID, /proc/cpuinfo, sysctl)
- `cpu.py`: the CPU variant libraries, llama.cpp's score of each here, registering the chosen one
- `gpu.py`: the GPU backend modules a runtime carries, loading one, its GPUs, the driver's fingerprint
- `offload.py`: how many layers and slots fit the GPUs' free memory
- `proof/`: the self-test in a forked child: the CPU variants (`__init__.py`) and the GPUs (`gpu.py`)

`runtime/hardware.py` asks these in order and keeps the answer for --info, the start-up lines and /props;
the engine takes the placement (device indices, layers) and builds llama.cpp's device list with `ggml.py`.
"""
