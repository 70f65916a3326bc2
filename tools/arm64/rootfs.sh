#!/usr/bin/env bash
# The emulated aarch64 test tier's Debian 12 (bookworm) arm64 root filesystem, as on Raspberry Pi OS Bookworm.
#
#   tools/arm64/rootfs.sh ensure              build it, or reuse the cached one, with its two venvs
#   tools/arm64/rootfs.sh run VENV CMD...     run CMD inside it (VENV: device or legacy), in the repository
#
# ensure (as root): installs debootstrap, qemu-user-static and binfmt-support from Debian when missing, mounts
# binfmt_misc and enables qemu-aarch64, then keeps under $ARM64_CACHE (default: .cache/arm64 in the repository):
#   rootfs/                     debootstrap --arch=arm64 --variant=minbase, one stage, with python3, mosquitto, ...
#   rootfs/opt/venv-device      extras device (ai-edge-litert, numpy 2), camera, dev: pinned by constraints-device.txt
#   rootfs/opt/venv-legacy      device-legacy (tflite-runtime 2.14, numpy<2), camera, dev: constraints-legacy.txt
# Each part carries a stamp of its inputs (package list; extras from pyproject.toml + constraints file) and is
# rebuilt only when they change; a part whose build was interrupted has no stamp and is rebuilt.
#
# run: a private mount namespace (every mount vanishes with the command, even when it is killed) with /proc, an
# aarch64 /proc/cpuinfo (qemu 7.2 passes the host's x86 one through, and ai-edge-litert's Interpreter() segfaults
# on it: cpuinfo-$QEMU_CPU here), /dev, /sys, a fresh /tmp and the repository bind-mounted at its own path and
# at /src/hosvd-edge (on the venvs' sys.path), then chroot. qemu emulates $QEMU_CPU: cortex-a72 (default, a Pi 4)
# or cortex-a76 (a Pi 5). The environment is cleared except CI, QEMU_CPU, HOSVD_* and PYTEST_ADDOPTS.
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
readonly SCRIPT_DIR
REPO=$(cd "$SCRIPT_DIR/../.." && pwd)
readonly REPO
readonly CACHE=${ARM64_CACHE:-$REPO/.cache/arm64}
readonly ROOTFS=$CACHE/rootfs
readonly SRC=/src/hosvd-edge
readonly SUITE=bookworm
readonly MIRROR=${ARM64_MIRROR:-http://deb.debian.org/debian}
# systemd for systemd-analyze and shellcheck: the unit and deploy-script tests run here too.
readonly PACKAGES=python3,python3-venv,mosquitto,mosquitto-clients,openssl,systemd,shellcheck
export QEMU_CPU=${QEMU_CPU:-cortex-a72}
readonly CPUINFO=$SCRIPT_DIR/cpuinfo-$QEMU_CPU

log() { printf '[arm64] %s\n' "$*" >&2; }
die() { printf '[arm64] error: %s\n' "$*" >&2; exit 1; }

sha() { sha256sum | cut -c1-16; }

# --- host set-up -------------------------------------------------------------------------------------------

host_tools() {
    local missing=()
    command -v debootstrap >/dev/null || missing+=(debootstrap)
    [ -x /usr/libexec/qemu-binfmt/aarch64-binfmt-P ] || [ -x /usr/bin/qemu-aarch64-static ] ||
        missing+=(qemu-user-static)
    command -v update-binfmts >/dev/null || missing+=(binfmt-support)
    if [ ${#missing[@]} -gt 0 ]; then
        [ "$(id -u)" -eq 0 ] || die "missing ${missing[*]}: run as root, or apt-get install ${missing[*]}"
        log "installing ${missing[*]} from Debian"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
}

binfmt() {
    local dir=/proc/sys/fs/binfmt_misc
    mountpoint -q "$dir" || mount -t binfmt_misc binfmt_misc "$dir"
    grep -qx enabled "$dir/qemu-aarch64" 2>/dev/null || update-binfmts --enable qemu-aarch64
    # F (fix binary): the kernel holds the interpreter open, so the chroot needs no qemu binary of its own.
    grep -q '^flags: .*F' "$dir/qemu-aarch64" ||
        die "qemu-aarch64 is registered without the F flag; reinstall qemu-user-static"
}

# --- stamps ------------------------------------------------------------------------------------------------

# A recipe's own text is part of its key: changing how a part is built rebuilds it.
base_key() { { echo "$SUITE arm64 minbase $PACKAGES"; declare -f build_rootfs; } | sha; }

# The extras as pyproject.toml lists them, so the venvs install what the Makefile's x86 venvs do.
requirements() {
    python3.11 - "$REPO/pyproject.toml" "$@" <<'EOF'
import sys, tomllib
extras = tomllib.load(open(sys.argv[1], "rb"))["project"]["optional-dependencies"]
tools = [r for r in extras["dev"] if not r.startswith("ruff")]  # what the tests need; no linter
print("\n".join([r for extra in sys.argv[2:] for r in extras[extra]] + tools))
EOF
}

# venv -> extras, as .venv-legacy in the Makefile (and .venv without the converter and demo)
venv_extras() {
    case $1 in
        device) echo device camera ;;
        legacy) echo device-legacy camera ;;
        *) die "no venv $1 (device, legacy)" ;;
    esac
}

venv_key() {
    # shellcheck disable=SC2046 # one word per extra
    { base_key; declare -f build_venv pip_env; requirements $(venv_extras "$1"); cat "$SCRIPT_DIR/constraints-$1.txt"; } | sha
}

stamp_ok() { [ -f "$1" ] && [ "$(cat "$1")" = "$2" ]; }

# --- the root filesystem -----------------------------------------------------------------------------------

remove_tree() {
    local dir=$1
    [ -e "$dir" ] || return 0
    if findmnt -rn -o TARGET | grep -q "^$dir\(/\|$\)"; then
        die "$dir has mounts under it; unmount them before it can be rebuilt"
    fi
    rm -rf --one-file-system "$dir"
}

build_rootfs() {
    local key new=$CACHE/rootfs.new
    key=$(base_key)
    stamp_ok "$ROOTFS/.hosvd-base" "$key" && return 0
    log "debootstrap $SUITE arm64 into $ROOTFS (a fresh machine: about 10 min)"
    remove_tree "$new"
    mkdir -p "$CACHE/debs"
    # In its own mount namespace: the /proc and /sys debootstrap mounts cannot outlive it.
    unshare --mount --propagation private \
        debootstrap --arch=arm64 --variant=minbase --include="$PACKAGES" --cache-dir="$CACHE/debs" \
        "$SUITE" "$new" "$MIRROR" >"$CACHE/debootstrap.log" 2>&1 ||
        die "debootstrap failed; see $CACHE/debootstrap.log"
    rm -rf "$new/var/cache/apt/archives/"*.deb "$new/var/lib/apt/lists/"*
    echo "$key" >"$new/.hosvd-base"
    remove_tree "$ROOTFS"
    mv "$new" "$ROOTFS"
}

# pip in the chroot reaches the package index the way the host's pip does: same index options and proxies
# (environment and pip config), and the host's CA bundle, copied in (the chroot has no ca-certificates).
pip_env() {
    local ca=${PIP_CERT:-${SSL_CERT_FILE:-}} index
    [ -n "$ca" ] || ca=$(pip3 config get global.cert 2>/dev/null || true)
    [ -n "$ca" ] || ca=/etc/ssl/certs/ca-certificates.crt
    [ -f "$ca" ] || die "no CA bundle at $ca for pip in the chroot; set PIP_CERT"
    install -m 0644 "$ca" "$ROOTFS/etc/ssl/host-ca.pem"
    echo "PIP_CERT=/etc/ssl/host-ca.pem SSL_CERT_FILE=/etc/ssl/host-ca.pem"
    index=${PIP_INDEX_URL:-$(pip3 config get global.index-url 2>/dev/null || true)}
    [ -n "$index" ] && echo "PIP_INDEX_URL=$index"
    local var
    for var in PIP_TRUSTED_HOST PIP_DEFAULT_TIMEOUT http_proxy https_proxy no_proxy HTTP_PROXY HTTPS_PROXY NO_PROXY; do
        [ -n "${!var:-}" ] && echo "$var=${!var}"
    done
    return 0
}

build_venv() {
    local name=$1 key dir=$ROOTFS/opt/venv-$1
    key=$(venv_key "$name")
    stamp_ok "$dir/.hosvd-stamp" "$key" && return 0
    log "venv-$name in the rootfs: pip install --no-compile (extras $(venv_extras "$name"), dev)"
    remove_tree "$dir"
    # shellcheck disable=SC2046 # one word per extra
    requirements $(venv_extras "$name") >"$ROOTFS/opt/requirements-$name.txt"
    cp "$SCRIPT_DIR/constraints-$name.txt" "$ROOTFS/opt/constraints-$name.txt"
    # The .pth puts the checkout on sys.path, as the editable install of the x86 venvs (run mounts it at $SRC).
    # shellcheck disable=SC2016,SC2046 # the script expands inside; one word per variable
    in_rootfs "" env $(pip_env) sh -ec '
        venv=/opt/venv-$1
        python3 -m venv "$venv"
        "$venv/bin/python" -m pip install --quiet --no-compile --disable-pip-version-check \
            -r "/opt/requirements-$1.txt" -c "/opt/constraints-$1.txt"
        for site in "$venv"/lib/python3*/site-packages; do echo "$2" >"$site/hosvd-edge-src.pth"; done
    ' build-venv "$name" "$SRC"
    echo "$key" >"$dir/.hosvd-stamp"
}

# --- running inside ----------------------------------------------------------------------------------------

# in_rootfs VENV CMD...: CMD in the chroot, cwd = the repository, VENV's bin first on PATH ("" for none).
in_rootfs() {
    local venv=$1 path=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin
    shift
    [ -f "$CPUINFO" ] || die "no $CPUINFO: QEMU_CPU must be cortex-a72 (a Pi 4) or cortex-a76 (a Pi 5)"
    [ -z "$venv" ] || path=/opt/venv-$venv/bin:$path
    local keep=(PATH="$path" HOME=/root LANG=C.UTF-8 QEMU_CPU="$QEMU_CPU")
    local var
    for var in $(compgen -e); do
        case $var in CI | HOSVD_* | PYTEST_ADDOPTS) keep+=("$var=${!var}") ;; esac
    done
    # shellcheck disable=SC2016 # expanded by the inner shell
    unshare --mount --propagation private -- /bin/bash -ec '
        root=$1 repo=$2 src=$3 cpuinfo=$4; shift 4
        mount -t proc proc "$root/proc"
        mount --bind "$cpuinfo" "$root/proc/cpuinfo"
        mount --rbind /dev "$root/dev"
        mount --rbind /sys "$root/sys"
        mount -t tmpfs -o size=4g tmpfs "$root/tmp"
        mount --bind /etc/resolv.conf "$root/etc/resolv.conf"
        mkdir -p "$root$repo" "$root$src"
        mount --bind "$repo" "$root$repo"
        mount --bind "$repo" "$root$src"
        exec chroot "$root" /usr/bin/env -i "$@"
    ' in_rootfs "$ROOTFS" "$REPO" "$SRC" "$CPUINFO" "${keep[@]}" \
        /bin/sh -c 'cd "$0" && exec "$@"' "$REPO" "$@"
}

with_lock() {
    local mode=$1
    shift
    mkdir -p "$CACHE"
    exec 9>"$CACHE/.lock"
    flock "$mode" 9
    "$@"
}

ensure() {
    [ "$(id -u)" -eq 0 ] || die "the arm64 tier needs root (debootstrap, mounts, chroot)"
    host_tools
    binfmt
    build_rootfs
    build_venv device
    build_venv legacy
    log "rootfs ready: $ROOTFS (QEMU_CPU=$QEMU_CPU)"
}

run() {
    [ $# -ge 2 ] || die "usage: $0 run VENV CMD..."
    local venv=$1
    venv_extras "$venv" >/dev/null
    stamp_ok "$ROOTFS/opt/venv-$venv/.hosvd-stamp" "$(venv_key "$venv")" ||
        die "the rootfs or venv-$venv is missing or stale: run $0 ensure first"
    in_rootfs "$@"
}

case ${1:-} in
    ensure) with_lock -x ensure ;;
    run) shift; with_lock -s run "$@" ;;
    *) die "usage: $0 ensure | run VENV CMD..." ;;
esac
