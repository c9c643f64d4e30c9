#!/usr/bin/env bash
# The portable Linux x86-64 runtime stub: every ELF file in it needs glibc 2.31 at most, so a bundle
# starts on Debian 11, Ubuntu 20.04, RHEL 9 and anything newer, not only on the machine that built it.
#
#   scripts/build_portable.sh [--dist DIR] [build.py options]   # the stub (build.py runs this by default)
#   scripts/build_portable.sh --gpu cuda [--dist DIR]            # the CUDA stub (its backend takes hours, once)
#   scripts/build_portable.sh prepare                            # only the compiled, cached parts
#   scripts/build_portable.sh wheel                              # only the root and the wheel (setup.sh)
#   scripts/build_portable.sh ready                              # exit 0 when those are cached
#   scripts/build_portable.sh wheel-dir | root-dir               # where the wheel and the Debian 11 root are
#   scripts/build_portable.sh gpu-backend NAME                   # GPU backend NAME, built against the root; prints its folder
#
# How: a minimal Debian 11 root (debootstrap; glibc 2.31, gcc 10's libstdc++ and libgomp) holds
# CPython 3.11 built from Debian's bookworm source package (--enable-shared, for PyInstaller) and a
# venv with the runtime's dependencies as manylinux wheels old enough for glibc 2.31 (NumPy's need
# 2.27). llama-cpp-python is compiled by this machine's GCC (12 or newer: the AMX and AVX-VNNI
# variants need it; Debian 11's GCC 10 has neither) against that root as its sysroot, so its
# libraries bind only to glibc 2.31 symbols and to Debian 11's libstdc++ and libgomp, which the stub
# carries. The same wheel serves the checkout's .venv (setup.sh), so llama.cpp is compiled once.
# build.py then runs inside the root with chroot, measures the stub's glibc needs and refuses one
# over the target. Everything but that last step is cached in $LLAMABOX_CACHE/portable and
# $LLAMABOX_CACHE/wheels, keyed by what it is made of; a change to the runtime's Python only
# reruns PyInstaller (about as long as the plain `build.py --host`).
#
# Needs root (debootstrap, chroot) on Linux x86-64, Debian's mirror and PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/llama_wheel.sh
source scripts/gpu_backends.sh

GLIBC_TARGET=2.31
SUITE=bullseye  # Debian 11, glibc 2.31
MIRROR=${LLAMABOX_DEBIAN_MIRROR:-http://deb.debian.org/debian}
ROOT_PACKAGES="build-essential pkg-config libssl-dev zlib1g-dev libbz2-dev liblzma-dev libsqlite3-dev libffi-dev
    libreadline-dev libncursesw5-dev uuid-dev xz-utils ca-certificates"
# CPython 3.11 (Debian 11 has 3.9): the upstream tarball inside Debian's bookworm source package.
PYTHON_SOURCE="python3.11 bookworm"
PYTHON_CONFIGURE="--prefix=/opt/python --enable-shared --with-ensurepip=install LDFLAGS=-Wl,-rpath,/opt/python/lib"
# Wheels for the venv: any manylinux tag the target glibc can load.
PLATFORMS="$(for v in 31 30 29 28 27 26 25 24 17 12 5; do printf ' --platform manylinux_2_%s_x86_64' $v; done) --platform manylinux2014_x86_64 --platform manylinux2010_x86_64 --platform manylinux1_x86_64 --platform linux_x86_64"

CACHE=${LLAMABOX_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/llamabox}
PY=${PYTHON:-.venv/bin/python}
cores=$(getconf _NPROCESSORS_ONLN 2>/dev/null || echo 2)

say() { echo "build_portable.sh: $*" >&2; }
in_root() { env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 chroot "$1" "${@:2}"; }

check_machine() {
    [ "$(uname -s)-$(uname -m)" = Linux-x86_64 ] || { say "builds only on Linux x86-64"; exit 1; }
    [ "$(id -u)" = 0 ] || { say "needs root (debootstrap and chroot); run it with sudo"; exit 1; }
}

need_debootstrap() {
    local missing=()
    command -v debootstrap >/dev/null || missing+=(debootstrap)
    # Ubuntu's debootstrap needs Debian's keys to check what it fetches.
    [ -f /usr/share/keyrings/debian-archive-keyring.gpg ] || missing+=(debian-archive-keyring)
    [ ${#missing[@]} = 0 ] && return 0
    command -v apt-get >/dev/null || { say "needs ${missing[*]}"; exit 1; }
    say "installing ${missing[*]}..."
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null \
        || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null; }
}

# The Debian 11 root with the build packages and CPython 3.11 in /opt/python.
make_root() {
    [ -f "$ROOT/.llamabox-ready" ] && return 0
    local started=$SECONDS partial="$ROOT.partial"
    need_debootstrap
    say "making a Debian 11 root with CPython 3.11 in $ROOT (about 8 minutes on 2 cores, once)..."
    rm -rf "$partial" && mkdir -p "$(dirname "$ROOT")"
    debootstrap --variant=minbase "$SUITE" "$partial" "$MIRROR" >"$partial.log" 2>&1 \
        || { tail -5 "$partial.log" >&2; say "debootstrap failed (log: $partial.log)"; exit 1; }
    echo "deb-src $MIRROR ${PYTHON_SOURCE#* } main" >"$partial/etc/apt/sources.list.d/python-source.list"
    cp /etc/resolv.conf "$partial/etc/resolv.conf"
    in_root "$partial" apt-get update -qq
    # shellcheck disable=SC2086
    in_root "$partial" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        $ROOT_PACKAGES >>"$partial.log" 2>&1 || { tail -5 "$partial.log" >&2; exit 1; }
    mkdir -p "$partial/build"
    in_root "$partial" sh -c "cd /build && apt-get source --download-only ${PYTHON_SOURCE% *}" >>"$partial.log" 2>&1
    tar -xf "$partial"/build/python3.11_*.orig.tar.* -C "$partial/build"
    tar -xf "$partial"/build/python3.11_*.debian.tar.* -C "$partial/build"
    # Debian's security fixes (CVE-* and 3.11 backports), not its file-layout patches.
    local p skipped=() source_dir patches="$partial/build/debian/patches"
    source_dir=$(echo "$partial"/build/Python-*)
    for p in $(grep -E '^(CVE-|[0-9]{4}-3\.11-)' "$patches/series"); do
        if patch -d "$source_dir" -p1 --forward --batch --dry-run <"$patches/$p" >/dev/null 2>&1; then
            patch -d "$source_dir" -p1 --forward --batch --quiet <"$patches/$p"
        else
            skipped+=("$p")
        fi
    done
    [ ${#skipped[@]} = 0 ] || say "Debian patches that do not apply to the upstream source, left out: ${skipped[*]}"
    # The CVE-2026-4224 backport makes pyexpat use an internal header, which needs the define that
    # pyexpat.c has from 3.12 on (Debian builds pyexpat into the interpreter, where it is set).
    grep -q '#include "pycore_' "$source_dir/Modules/pyexpat.c" && ! grep -q Py_BUILD_CORE_MODULE "$source_dir/Modules/pyexpat.c" \
        && sed -i '1i #ifndef Py_BUILD_CORE_BUILTIN\n#  define Py_BUILD_CORE_MODULE 1\n#endif' "$source_dir/Modules/pyexpat.c"
    say "compiling CPython $(basename "$partial"/build/Python-*) in the root..."
    # shellcheck disable=SC2086
    in_root "$partial" sh -c "cd /build/Python-* && ./configure $PYTHON_CONFIGURE && make -j$cores && make install" \
        >"$partial.python.log" 2>&1 || { tail -20 "$partial.python.log" >&2; say "CPython failed to build"; exit 1; }
    in_root "$partial" /opt/python/bin/python3.11 -c "import ctypes, ssl, sqlite3, lzma, bz2, zlib, readline, uuid, pyexpat" \
        || { say "CPython is missing a module (log: $partial.python.log)"; exit 1; }
    rm -rf "$partial/build" "$partial/var/cache/apt/archives"/*.deb
    # Absolute links to libraries would point into this machine when the root is a sysroot.
    find "$partial/usr/lib" "$partial/usr/lib64" -type l \( -lname '/lib*' -o -lname '/usr/lib*' \) | while read -r link; do
        ln -sfn "$(realpath -m -s --relative-to="$(dirname "${link#"$partial"}")" "$(readlink "$link")")" "$link"
    done
    touch "$partial/.llamabox-ready"
    rm -rf "$ROOT" && mv "$partial" "$ROOT" && mv "$partial.log" "$partial.python.log" "$ROOT/"
    say "root ready in $((SECONDS - started)) s"
}

# with_sysroot COMMAND...: run it with the flags that make this machine's GCC compile against the root's
# glibc, libstdc++ and libgomp (llama-cpp-python's wheel and the GPU backends).
with_sysroot() {
    local sys="--sysroot=$ROOT -B$ROOT/usr/lib/x86_64-linux-gnu" gcc10="$ROOT/usr/lib/gcc/x86_64-linux-gnu/10"
    local cxx="-nostdinc++ -isystem $ROOT/usr/include/c++/10 -isystem $ROOT/usr/include/x86_64-linux-gnu/c++/10"
    local libs="$ROOT/usr/lib/x86_64-linux-gnu"
    [ -d "$gcc10" ] || { say "the root has no GCC 10 runtime ($gcc10)"; exit 1; }
    CFLAGS="$sys" CXXFLAGS="$sys $cxx -isystem $ROOT/usr/include/c++/10/backward" \
        LDFLAGS="$sys -L$gcc10 -L$libs -Wl,-rpath-link,$libs" "$@"
}

make_wheel() { with_sysroot build_llama_wheel "$PY" "$WHEEL_DIR"; }

# The GPU backends every portable stub carries (scripts/gpu_backends.sh), compiled against the root too.
make_gpu_backends() {
    local name
    for name in $GPU_BACKENDS; do
        with_sysroot build_gpu_backend "$PY" "$name" "$(gpu_backend_dir "$name" "$TOOLCHAIN_ID")"
    done
}


# /opt/venv in the root: the runtime's dependencies (the versions this checkout's .venv has when it
# is made, where it has them) and the portable wheel, installed from wheels fetched here (PyPI is reached from
# this machine with its own pip settings, never from inside the root).
make_venv() {
    local wheel deps constraints stamp house="$ROOT/opt/wheelhouse"
    wheel=$(ls "$WHEEL_DIR"/llama_cpp_python-*.whl)
    mapfile -t deps < <("$PY" -c 'import tomllib; print("\n".join(d for d in tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"] if not d.startswith("llama-cpp-python")))')
    constraints=$("$PY" -m pip freeze --exclude-editable 2>/dev/null | grep -v -e '@' -e '^llama' || true)
    # Remade when the dependencies or the wheel change (not whenever .venv gains a test package).
    stamp=$(printf '%s\n' "${deps[@]}" "$(basename "$wheel")" "$(hash_of <"$wheel")" | hash_of | cut -c1-16)
    [ "$(cat "$ROOT/opt/venv/.llamabox-stamp" 2>/dev/null)" = "$stamp" ] && return 0
    say "installing the runtime's dependencies into the root's venv..."
    rm -rf "$house" && mkdir -p "$house"
    printf '%s\n' "$constraints" >"$house/constraints.txt"
    cp "$wheel" "$house/"
    # shellcheck disable=SC2086
    "$PY" -m pip download --quiet --only-binary=:all: --python-version 3.11 --implementation cp \
        --abi cp311 --abi abi3 --abi none $PLATFORMS -c "$house/constraints.txt" -d "$house" \
        "${deps[@]}" "$house/$(basename "$wheel")"
    in_root "$ROOT" /opt/python/bin/python3.11 -m venv --clear /opt/venv
    in_root "$ROOT" /opt/venv/bin/python -m pip install --quiet --no-index --find-links /opt/wheelhouse \
        "${deps[@]}" "/opt/wheelhouse/$(basename "$wheel")"
    echo "$stamp" >"$ROOT/opt/venv/.llamabox-stamp"
}

# The GPU backends beside the CPU variants in the root's venv, where build.py takes every backend from
# (and only the stub built with `--gpu NAME` takes those that have a stub of their own, such as CUDA's).
install_gpu_backends() {
    local name
    for name in $GPU_BACKENDS "$@"; do
        install_gpu_backend "$(gpu_backend_dir "$name" "$TOOLCHAIN_ID")" "$ROOT/opt/venv/lib/python3.11/site-packages/bin"
    done
}

prepare() {
    check_machine
    make_root
    make_wheel
    make_gpu_backends
    make_venv
    install_gpu_backends
}

# build.py inside the root, on a copy of this checkout's runtime, into DIST.
build_stub() {
    local dist=dist/stubs args=() work name=llamabox-runtime-linux-x86_64 gpu=""
    while [ $# -gt 0 ]; do
        case "$1" in
            --dist) dist=$2; shift 2 ;;
            --dist=*) dist=${1#--dist=}; shift ;;
            --gpu) gpu=$2; args+=(--gpu "$2"); shift 2 ;;
            *) args+=("$1"); shift ;;
        esac
    done
    prepare
    if [ -n "$gpu" ]; then
        with_sysroot build_gpu_backend "$PY" "$gpu" "$(gpu_backend_dir "$gpu" "$TOOLCHAIN_ID")"
        install_gpu_backends "$gpu"
        name=$name-$gpu
    fi
    work=$(mktemp -d "$ROOT/tmp/llamabox-build.XXXXXX")
    trap "rm -rf '$work'" EXIT
    mkdir -p "$work/src" "$work/dist"
    tar -cf - --exclude=__pycache__ build.py runtime bundler templates | tar -xf - -C "$work/src"
    in_root "$ROOT" /opt/venv/bin/python "/${work#"$ROOT"/}/src/build.py" --host --max-glibc "$GLIBC_TARGET" \
        --dist "/${work#"$ROOT"/}/dist" "${args[@]}"
    mkdir -p "$dist"
    cp "$work/dist/$name" "$dist/.$name.partial" && mv "$dist/.$name.partial" "$dist/$name"
    echo "Portable stub: $dist/$name"
}

# The root is keyed by its recipe (make_root's own text included); the wheel by the sysroot's
# packages and its own recipe, besides the version, flags and patches (llama_wheel_dir).
root_id=$( { printf '%s\n' "$SUITE" "$ROOT_PACKAGES" "$PYTHON_SOURCE" "$PYTHON_CONFIGURE"; declare -f make_root; } \
    | hash_of | cut -c1-12)
ROOT="$CACHE/portable/debian-$SUITE-python3.11-$root_id"
sysroot_id=$( { printf '%s\n' "$SUITE" "$ROOT_PACKAGES"; declare -f with_sysroot; } | hash_of | cut -c1-8)
TOOLCHAIN_ID="glibc$GLIBC_TARGET-$sysroot_id"
WHEEL_DIR=$(llama_wheel_dir "$TOOLCHAIN_ID")

# One build at a time per root: a venv being remade under another build's PyInstaller would break it.
lock() { mkdir -p "$(dirname "$ROOT")" && exec 9>"$ROOT.lock" && flock 9; }

case "${1:-}" in
    prepare) lock && prepare ;;
    wheel) lock && check_machine && make_root && make_wheel ;;
    gpu-backend) lock && check_machine && make_root && with_sysroot build_gpu_backend "$PY" "$2" "$(gpu_backend_dir "$2" "$TOOLCHAIN_ID")" \
        && gpu_backend_dir "$2" "$TOOLCHAIN_ID" ;;
    ready) [ "$(id -u)" = 0 ] && [ -f "$ROOT/.llamabox-ready" ] && ls "$WHEEL_DIR"/llama_cpp_python-*.whl >/dev/null 2>&1 ;;
    wheel-dir) echo "$WHEEL_DIR" ;;
    root-dir) echo "$ROOT" ;;
    *) lock && build_stub "$@" ;;
esac
