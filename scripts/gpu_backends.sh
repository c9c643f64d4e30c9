# Sourced by setup.sh and build_portable.sh, after llama_wheel.sh: llama.cpp's GPU backends as loadable
# modules (GGML_BACKEND_DL), compiled from the same sdist and patches as the CPU wheel and dropped beside its
# CPU variants, where the runtime and build.py find them. Each module is built once per version, flags,
# patches, toolchain and recipe, and cached in $LLAMABOX_CACHE/backends/ like the wheel.
#
#   vulkan  in every stub: needs only the Vulkan loader (libvulkan.so.1) and a driver on the receiving machine.
#           Compiled against Debian 13's Vulkan headers, SPIR-V headers and glslc (2025.2), unpacked into a
#           private folder (no system package is installed or changed): Debian 12's headers are too old for this
#           ggml-vulkan, and its glslc lacks the cooperative-matrix, integer-dot and bfloat16 shader extensions,
#           which ggml would then leave out (the tensor-core paths). Debian 13's glslc needs glibc 2.38, so it
#           runs through the dynamic loader it came with.
#   rpc     in every Linux x86-64 stub: ggml's RPC backend, with which a bundle serves its device to other
#           machines (--rpc-worker) and uses theirs (--rpc); it needs nothing from the machine but its network.
#   cuda    only in the CUDA stub (build.py --gpu cuda; setup.sh --gpu cuda): compiled by the nvcc 13.0 in
#           $LLAMABOX_CUDA_HOME (/usr/local/cuda) for real sm_80, sm_86, sm_89 and sm_90 code plus compute_75 PTX,
#           which the driver compiles once for every other GPU from Turing on (Blackwell included). It links
#           the CUDA runtime and cuBLAS from PyPI's nvidia-* wheels, which the stub carries beside it, so that
#           the receiving machine needs only the NVIDIA driver. The toolkit here has no libcuda stub to link
#           against: one is made from cuda.h's declarations (the driver's real libcuda.so.1 is used at run time).

# The backends setup.sh builds (LLAMABOX_GPU_BACKENDS= builds none).
GPU_BACKENDS=${LLAMABOX_GPU_BACKENDS-vulkan rpc}
GPU_BACKEND_RECIPE_VERSION=1
TRIXIE_MIRROR=${LLAMABOX_DEBIAN_MIRROR:-http://deb.debian.org/debian}
VULKAN_SDK_PACKAGES="libvulkan-dev libvulkan1 spirv-headers glslc libshaderc1 libc6 libgcc-s1 libstdc++6"
CUDA_HOME=${LLAMABOX_CUDA_HOME:-/usr/local/cuda}
# The 13.0 releases, as nvcc 13.0: they run on every driver from R580 on (CUDA's minor-version compatibility).
CUDA_PACKAGES="nvidia-cuda-runtime==13.0.96 nvidia-cublas==13.0.2.14"
CUDA_ARCHITECTURES="75-virtual;80-real;86-real;89-real;90-real"
# The libraries from CUDA_PACKAGES that the module needs, in the order the runtime loads them.
CUDA_LIBRARIES="libcudart.so.13 libcublasLt.so.13 libcublas.so.13"

_gpu_cache() { echo "${LLAMABOX_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/llamabox}"; }

# vulkan_sdk: the private folder with Debian 13's Vulkan headers, loader, SPIR-V headers and a glslc wrapper.
vulkan_sdk() {
    local sdk partial apt_dir opts d
    sdk="$(_gpu_cache)/toolchains/vulkan-sdk-debian13-$(printf '%s' "$VULKAN_SDK_PACKAGES" | hash_of | cut -c1-8)"
    if [ ! -x "$sdk/bin/glslc" ]; then
        command -v apt-get >/dev/null && command -v dpkg >/dev/null \
            || { echo "the Vulkan backend is built with Debian 13's packages: needs apt-get and dpkg" >&2; return 1; }
        # Ubuntu's apt does not know Debian's signing keys: its package of them does.
        [ -f /usr/share/keyrings/debian-archive-keyring.gpg ] \
            || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debian-archive-keyring >/dev/null \
            || { echo "the Vulkan backend needs Debian's archive keys (apt-get install debian-archive-keyring)" >&2; return 1; }
        echo "Fetching Debian 13's Vulkan headers, SPIR-V headers and glslc into $sdk..." >&2
        partial="$sdk.partial" apt_dir="$sdk.partial/apt"
        rm -rf "$partial" && mkdir -p "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial" "$partial/debs" "$partial/root"
        echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $TRIXIE_MIRROR trixie main" >"$apt_dir/sources.list"
        opts=(-o "Dir::Etc::sourcelist=$apt_dir/sources.list" -o Dir::Etc::sourceparts=/dev/null
              -o "Dir::State::Lists=$apt_dir/lists" -o "Dir::Cache=$apt_dir/cache" -o APT::Sandbox::User=root)
        apt-get "${opts[@]}" update -qq >/dev/null || return 1
        # shellcheck disable=SC2086
        (cd "$partial/debs" && apt-get "${opts[@]}" download -qq $VULKAN_SDK_PACKAGES >/dev/null) || return 1
        for d in "$partial"/debs/*.deb; do dpkg -x "$d" "$partial/root"; done
        mkdir -p "$partial/bin"
        # Relative to the wrapper, so that the folder may move.
        cat >"$partial/bin/glslc" <<'EOF'
#!/bin/sh
root=$(cd "$(dirname "$0")/../root" && pwd)
lib=$root/usr/lib/x86_64-linux-gnu
exec "$lib/ld-linux-x86-64.so.2" --library-path "$lib" "$root/usr/bin/glslc" "$@"
EOF
        chmod +x "$partial/bin/glslc"
        "$partial/bin/glslc" --version >/dev/null || { echo "Debian 13's glslc does not run here" >&2; return 1; }
        rm -rf "$apt_dir" "$partial/debs" "$sdk" && mv "$partial" "$sdk"
    fi
    echo "$sdk"
}

# cuda_libs: the private folder with the CUDA runtime and cuBLAS from PyPI (lib/, include/) and a libcuda
# stub to link against (stubs/).
cuda_libs() {
    local dir partial wheel names
    dir="$(_gpu_cache)/toolchains/cuda-libs-$(printf '%s' "$CUDA_PACKAGES" | hash_of | cut -c1-8)"
    if [ ! -f "$dir/stubs/libcuda.so" ]; then
        [ -x "$CUDA_HOME/bin/nvcc" ] || { echo "the CUDA backend needs nvcc 13 in $CUDA_HOME (or LLAMABOX_CUDA_HOME)" >&2; return 1; }
        echo "Fetching the CUDA runtime and cuBLAS ($CUDA_PACKAGES) into $dir..." >&2
        partial="$dir.partial"
        rm -rf "$partial" && mkdir -p "$partial/wheels" "$partial/root" "$partial/stubs"
        # shellcheck disable=SC2086
        python3 -m pip download --quiet --no-deps --only-binary=:all: -d "$partial/wheels" $CUDA_PACKAGES || return 1
        for wheel in "$partial"/wheels/*.whl; do python3 -m zipfile -e "$wheel" "$partial/root"; done
        mv "$partial/root/nvidia/cu13/lib" "$partial/lib" && mv "$partial/root/nvidia/cu13/include" "$partial/include"
        # Every driver function cuda.h declares (after its _v2-style renames), as an empty stub.
        names=$(gcc -E -P -I"$CUDA_HOME/include" "$CUDA_HOME/include/cuda.h" | tr -s ' \n' ' ' \
            | grep -oE 'CUresult ((__attribute__\(\([^)]*\)\)|CUDAAPI) )*cu[A-Za-z0-9_]+ ?\(' \
            | grep -oE 'cu[A-Za-z0-9_]+ ?\($' | tr -d ' (' | sort -u)
        [ -n "$names" ] || { echo "found no driver functions in $CUDA_HOME/include/cuda.h" >&2; return 1; }
        for n in $names; do echo "int $n(void) { return 999; }"; done >"$partial/stubs/libcuda.c"
        gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$partial/stubs/libcuda.so" "$partial/stubs/libcuda.c" || return 1
        rm -rf "$partial/wheels" "$partial/root" "$dir" && mv "$partial" "$dir"
    fi
    echo "$dir"
}

# The CMake flags of one GPU backend, one a line (fetches the Vulkan SDK or the CUDA libraries when needed).
_gpu_cmake_flags() {
    local name=$1 sdk
    case "$name" in
        vulkan)
            sdk=$(vulkan_sdk) || return 1
            printf '%s\n' -DGGML_VULKAN=ON "-DVulkan_INCLUDE_DIR=$sdk/root/usr/include" \
                "-DVulkan_LIBRARY=$sdk/root/usr/lib/x86_64-linux-gnu/libvulkan.so.1" \
                "-DVulkan_GLSLC_EXECUTABLE=$sdk/bin/glslc" "-DCMAKE_PREFIX_PATH=$sdk/root/usr" ;;
        rpc)
            printf '%s\n' -DGGML_RPC=ON ;;
        cuda)
            sdk=$(cuda_libs) || return 1
            # nvcc's host compiler gets the portable build's sysroot flags (CXXFLAGS) through -Xcompiler.
            printf '%s\n' -DGGML_CUDA=ON "-DCMAKE_CUDA_COMPILER=$CUDA_HOME/bin/nvcc" "-DCUDAToolkit_ROOT=$CUDA_HOME" \
                "-DCMAKE_CUDA_ARCHITECTURES=$CUDA_ARCHITECTURES" -DGGML_CUDA_COMPRESSION_MODE=size \
                "-DCUDA_cublas_LIBRARY=$sdk/lib/libcublas.so.13" "-DCUDA_cublasLt_LIBRARY=$sdk/lib/libcublasLt.so.13" \
                "-DCUDA_cudart_LIBRARY=$sdk/lib/libcudart.so.13" "-DCUDA_cuda_driver_LIBRARY=$sdk/stubs/libcuda.so" \
                "-DCMAKE_CUDA_FLAGS=-I$sdk/include${CXXFLAGS:+ -Xcompiler=$(echo $CXXFLAGS | tr ' ' ',')}" ;;
        *) echo "unknown GPU backend $name" >&2; return 1 ;;
    esac
}

# _gpu_companions NAME DIR: the libraries the module of NAME needs that the receiving machine lacks, into DIR.
_gpu_companions() {
    local lib sdk
    case "$1" in
        cuda)
            sdk=$(cuda_libs) || return 1
            for lib in $CUDA_LIBRARIES; do cp "$sdk/lib/$lib" "$2/"; done ;;
    esac
}

# What one backend's module is made of besides the sources: its toolchain's recipe.
_gpu_recipe() {
    case "$1" in
        vulkan) echo "$VULKAN_SDK_PACKAGES"; declare -f vulkan_sdk ;;
        cuda) echo "$CUDA_HOME" "$CUDA_PACKAGES" "$CUDA_ARCHITECTURES"; "$CUDA_HOME/bin/nvcc" --version | tail -1; declare -f cuda_libs ;;
    esac
    declare -f _gpu_cmake_flags _gpu_companions
}

# gpu_backend_dir NAME [TOOLCHAIN_ID]: where the cached module of backend NAME lives (built or not).
gpu_backend_dir() {
    local id
    id=$( { printf '%s\n' "$1" "$GPU_BACKEND_RECIPE_VERSION" "${2:-}"; _gpu_recipe "$1"; \
            declare -f build_gpu_backend; cat scripts/patches/*.patch; ! [ -d scripts/patches/"$1" ] || cat scripts/patches/"$1"/*.patch; } | hash_of | cut -c1-12)
    echo "$(_gpu_cache)/backends/ggml-$1-llama-cpp-python-$LLAMA_CPP_PYTHON_VERSION${2:+-$2}-$id"
}

# build_gpu_backend PYTHON NAME OUT_DIR: libggml-NAME.so into OUT_DIR unless it is there. CFLAGS, CXXFLAGS and
# LDFLAGS from the environment reach the compiler (the portable build's sysroot), as for the wheel.
build_gpu_backend() {
    local python=$1 name=$2 out=$3 work src flags_text flags cores started=$SECONDS bin
    # No RUNPATH: the module finds libggml-base in the process that loads it and the Vulkan loader on the
    # receiving machine, never in the folders it was built with.
    [ -f "$out/libggml-$name.so" ] && return 0
    bin=$(cd "$(dirname "$python")" && pwd)
    "$python" -m pip install --quiet cmake ninja
    flags_text=$(_gpu_cmake_flags "$name") || return 1
    mapfile -t flags <<<"$flags_text"
    cores=$(getconf _NPROCESSORS_ONLN 2>/dev/null || echo 2)
    echo "Building llama.cpp's $name backend (once; on 2 cores Vulkan takes about 8 minutes, CUDA hours)..." >&2
    work="$out.work"
    rm -rf "$work" "$out" && mkdir -p "$work"
    src=$(llama_source "$python" "$work") || return 1
    for p in scripts/patches/"$name"/*.patch; do  # patches to this backend alone (scripts/patches/rpc/)
        [ -f "$p" ] || continue
        patch -d "$src" -p1 --forward --batch --quiet <"$p" \
            || { echo "$p no longer applies to llama-cpp-python $LLAMA_CPP_PYTHON_VERSION; refresh or drop it" >&2; return 1; }
    done
    "$bin/cmake" -S "$src/vendor/llama.cpp" -B "$work/build" -G Ninja -DCMAKE_MAKE_PROGRAM="$bin/ninja" \
        -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON -DGGML_BACKEND_DL=ON -DGGML_NATIVE=OFF -DGGML_CPU=OFF \
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF \
        -DLLAMA_BUILD_COMMON=OFF -DLLAMA_CURL=OFF -DCMAKE_SKIP_RPATH=ON "${flags[@]}" >"$work/configure.log" 2>&1 \
        || { tail -20 "$work/configure.log" >&2; echo "CMake could not configure the $name backend (log: $work/configure.log)" >&2; return 1; }
    grep -E "(supported|not supported) by glslc" "$work/configure.log" >&2 || true
    "$bin/cmake" --build "$work/build" --target "ggml-$name" -j "$cores" >"$work/build.log" 2>&1 \
        || { tail -20 "$work/build.log" >&2; echo "the $name backend failed to build (log: $work/build.log)" >&2; return 1; }
    mkdir -p "$out.partial"
    cp "$(find "$work/build" -name "libggml-$name.so" | head -1)" "$out.partial/"
    strip --strip-unneeded "$out.partial/libggml-$name.so"
    cp "$work/configure.log" "$out.partial/"
    _gpu_companions "$name" "$out.partial" || return 1
    rm -rf "$work" && mv "$out.partial" "$out"
    echo "Built libggml-$name.so ($(du -m "$out/libggml-$name.so" | cut -f1) MB) in $((SECONDS - started)) s" >&2
}

# install_gpu_backend MODULE_DIR BACKENDS_DIR: put a built module beside the CPU variants.
install_gpu_backend() {
    cp "$1"/lib*.so* "$2/"
}
