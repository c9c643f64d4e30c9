#!/bin/sh
# llamabox launcher: the first bytes of every Linux and macOS runtime stub and bundle.
#
# What follows this script in the file (runtime/bundle_format.py defines the layout): the runtime, a
# PyInstaller one-folder build packed as .tar.gz, then the model. The runtime is unpacked once per runtime
# build into $LLAMABOX_CACHE or the user's cache folder, published atomically, and run from there by every
# later start; the weights are never unpacked: the runtime maps them from this file.
#
# Why POSIX sh and not a compiled or PyInstaller one-file launcher: sh starts in a millisecond, while a
# one-file launcher unpacks its own Python at every start (90 ms measured), most of what the cache saves.
# build.py fills in the fields between at signs; nothing after `exit` below is ever read by the shell.
id=@RUNTIME_ID@
exe=@EXECUTABLE@
skip=@PAYLOAD_BLOCKS_BEFORE@
blocks=@PAYLOAD_BLOCKS@
end=@PAYLOAD_END@
unpacked_mb=@UNPACKED_MB@
needed="@NEEDED_FILES@"

self=$0
case $self in /*) ;; *) self=$PWD/$self ;; esac
name=${self##*/}

say() { printf 'llamabox: %s\n' "$*" >&2; }

# Whether $1 holds this runtime, whole, on a file system that may run programs.
usable() {
    for f in .llamabox-complete $needed; do [ -f "$1/$f" ] || return 1; done
    "$1/.llamabox-probe" 2>/dev/null
}

launch() {
    LLAMABOX_BUNDLE=$self LLAMABOX_RUNTIME_DIR=$1 LLAMABOX_RUNTIME_TEMPORARY=$2
    export LLAMABOX_BUNDLE LLAMABOX_RUNTIME_DIR LLAMABOX_RUNTIME_TEMPORARY
    shift 2
    exec "$LLAMABOX_RUNTIME_DIR/$exe" "$@"
}

# Whether programs may run from folder $1 (not on a noexec file system) and it can be written.
can_run_in() {
    probe="$1/.llamabox-probe-$$"
    printf '#!/bin/sh\n' >"$probe" 2>/dev/null && chmod +x "$probe" && "$probe" 2>/dev/null
    ran=$?
    rm -f "$probe"
    return $ran
}

# Stop with a clear message where no folder can help: a cut download, missing tools.
check_can_unpack() {
    command -v gzip >/dev/null && command -v tar >/dev/null && command -v dd >/dev/null || {
        say "$name needs gzip, tar and dd to unpack its runtime the first time; install them"
        exit 1
    }
    size=$(wc -c <"$self") || exit 1
    if [ "$size" -lt "$end" ]; then
        say "$name is incomplete ($size bytes; its runtime alone is $end): the download or copy was cut short; copy or download it again"
        exit 1
    fi
}

# Unpack into a new folder under $1; print its path.
unpack() {
    into=$(mktemp -d "$1/$id.XXXXXX" 2>/dev/null) || return 1
    chmod 755 "$into"  # mktemp's 700 would keep the other users of a shared LLAMABOX_CACHE out
    dd if="$self" bs=4096 skip="$skip" count="$blocks" 2>/dev/null | gzip -dc 2>/dev/null | (cd "$into" && tar -xf - 2>/dev/null)
    # The archive's last member is .llamabox-complete: a cut or failed unpacking lacks it.
    if [ -f "$into/.llamabox-complete" ]; then
        printf '%s\n' "$into"
    else
        rm -rf "$into"
        return 1
    fi
}

if [ -n "${LLAMABOX_CACHE:-}" ]; then
    cache=$LLAMABOX_CACHE
elif [ -n "${HOME:-}" ]; then
    cache=@CACHE_HOME@/llamabox
else
    cache=
fi
runtimes=$cache/runtime

if [ -n "$cache" ] && usable "$runtimes/$id"; then
    launch "$runtimes/$id" 0 "$@"
fi

check_can_unpack
if [ -n "$cache" ] && mkdir -p "$runtimes" 2>/dev/null && can_run_in "$runtimes"; then
    say "preparing the runtime for its first start: unpacking $unpacked_mb MB into $runtimes/$id (once per runtime build)..."
    if fresh=$(unpack "$runtimes"); then
        # Published by creating a symbolic link, which is atomic: of two first starts at once, one link wins; the
        # other start removes its own copy and runs the winner's. A damaged copy's link is replaced.
        [ -L "$runtimes/$id" ] && ! usable "$runtimes/$id" && rm -f "$runtimes/$id"
        ln -sn "${fresh##*/}" "$runtimes/$id" 2>/dev/null || rm -rf "$fresh"  # -n: never into the winner's folder
        if usable "$runtimes/$id"; then
            launch "$runtimes/$id" 0 "$@"
        fi
    fi
    say "could not unpack the runtime into $runtimes (is the disk full?); using a temporary folder for this run"
elif [ -n "$cache" ]; then
    say "cannot write to or run programs from $runtimes (read-only, or mounted noexec); using a temporary folder for this run (set LLAMABOX_CACHE to a writable folder that may run programs to unpack only once)"
else
    say "HOME is not set; using a temporary folder for this run (set LLAMABOX_CACHE to a writable folder to unpack only once)"
fi

tried=
for base in "${TMPDIR:-/tmp}" /tmp /var/tmp /dev/shm; do
    case " $tried " in *" $base "*) continue ;; esac
    tried="$tried $base"
    [ -d "$base" ] && can_run_in "$base" || continue
    if fresh=$(unpack "$base"); then
        if usable "$fresh"; then
            launch "$fresh" 1 "$@"
        fi
        rm -rf "$fresh"
    fi
done
say "cannot unpack the runtime anywhere it may run programs (tried:$tried); set LLAMABOX_CACHE to a writable folder on a file system mounted without noexec"
exit 1
