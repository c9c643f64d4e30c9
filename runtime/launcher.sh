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
needed="@NEEDED_FILES@"  # NAME:SIZE of what must be whole before Python can start and check the rest itself

self=$0
case $self in
    */*) ;;
    *) [ -f "$self" ] || self=$(command -v -- "$self") || self=$0 ;;  # `sh NAME` found on PATH
esac
case $self in /*) ;; *) self=$PWD/$self ;; esac
name=${self##*/}

say() { printf 'llamabox: %s\n' "$*" >&2; }

# Whether $1 holds this runtime, unpacked whole (the launcher marks it so), on a file system that may run programs.
usable() {
    [ -f "$1/.llamabox-complete" ] || return 1
    for entry in $needed; do [ -s "$1/${entry%:*}" ] || return 1; done
    "$1/.llamabox-probe" 2>/dev/null
}

launch() {
    LLAMABOX_BUNDLE=$self LLAMABOX_RUNTIME_DIR=$1 LLAMABOX_RUNTIME_TEMPORARY=$2
    export LLAMABOX_BUNDLE LLAMABOX_RUNTIME_DIR LLAMABOX_RUNTIME_TEMPORARY
    shift 2
    exec "$LLAMABOX_RUNTIME_DIR/$exe" "$@"
}

# Whether programs may run from folder $1 (not a noexec file system) and it can be written.
can_run_in() {
    probe=$(mktemp "$1/.llamabox-probe.XXXXXX" 2>/dev/null) || return 1
    printf '#!/bin/sh\n' >"$probe" && chmod 700 "$probe" && "$probe" 2>/dev/null
    ran=$?
    rm -f "$probe"
    return $ran
}

# Stop with a clear message where no folder can help: a cut download, missing tools.
check_can_unpack() {
    for tool in gzip tar dd mktemp; do
        command -v $tool >/dev/null || {
            say "$name needs gzip, tar, dd and mktemp to unpack its runtime the first time, and $tool is missing; install it"
            exit 1
        }
    done
    size=$(wc -c <"$self") || exit 1
    if [ "$size" -lt "$end" ]; then
        say "$name is incomplete ($size bytes; its runtime alone is $end): the download or copy was cut short; copy or download it again"
        exit 1
    fi
}

# The packed runtime, in whole blocks: gzip passes over the zeros after it.
payload() { dd if="$self" bs=4096 skip="$skip" count="$blocks" 2>/dev/null; }

# Unpack into a new folder under $1 (mode $2), check it and mark it whole; print its path. Returns 2, having said
# so, when the payload itself is damaged: no other folder can help then.
unpack() {
    into=
    trap 'rm -rf "$into"; exit 130' INT TERM HUP  # interrupted: leave nothing half-unpacked
    into=$(mktemp -d "$1/$id.XXXXXX" 2>/dev/null) || return 1
    chmod "$2" "$into"
    # sh has no pipefail, and tar may have unpacked every file before gzip finds the checksum wrong at the very
    # end: gzip's failure leaves a mark for the test below.
    if { payload | gzip -dc 2>/dev/null || : >"$into/.llamabox-damaged"; } | (cd "$into" && tar -xf - 2>/dev/null) &&
        [ ! -e "$into/.llamabox-damaged" ]; then
        whole=yes
        for entry in $needed; do
            [ -f "$into/${entry%:*}" ] && [ $(($(wc -c <"$into/${entry%:*}"))) -eq "${entry##*:}" ] || whole=no
        done
        if [ $whole = yes ] && : >"$into/.llamabox-complete"; then
            trap - INT TERM HUP
            printf '%s\n' "$into"
            return 0
        fi
    fi
    rm -rf "$into"  # tar or gzip failed, or files came out short: never published, never run
    trap - INT TERM HUP
    # The folder (a full disk?) is blamed only when the payload is whole: garbled data can make tar fail too.
    if ! payload | gzip -t 2>/dev/null; then
        say "the runtime inside $self is damaged; copy or download it again"
        return 2
    fi
    return 1
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
    fresh=$(unpack "$runtimes" 755)
    unpacked=$?
    [ $unpacked -eq 2 ] && exit 1
    if [ $unpacked -eq 0 ]; then
        # Published by creating a symbolic link, which is atomic: of two first starts at once, one link wins; the
        # other start removes its own copy and runs the winner's. A damaged copy's link is replaced.
        [ -L "$runtimes/$id" ] && ! usable "$runtimes/$id" && rm -f "$runtimes/$id"
        if ln -sn "${fresh##*/}" "$runtimes/$id" 2>/dev/null; then  # -n: never into the winner's folder
            :
        elif [ -L "$runtimes/$id" ]; then
            rm -rf "$fresh"
        else
            say "cannot make links in $runtimes (a file system without them?); running this copy once (set LLAMABOX_CACHE to a folder on another file system to unpack only once)"
            launch "$fresh" 1 "$@"
        fi
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
    fresh=$(unpack "$base" 700)
    unpacked=$?
    [ $unpacked -eq 2 ] && exit 1
    if [ $unpacked -eq 0 ]; then
        if usable "$fresh"; then
            launch "$fresh" 1 "$@"
        fi
        rm -rf "$fresh"
    fi
done
say "cannot unpack the runtime anywhere it may run programs (tried:$tried); set LLAMABOX_CACHE to a writable folder on a file system mounted without noexec"
exit 1
