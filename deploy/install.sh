#!/usr/bin/env bash
# Install the hosvd-edge device daemon on a Raspberry Pi (or any 64-bit systemd Linux). Run as root.
#
#   sudo deploy/install.sh [options] [SOURCE]
#
# SOURCE is a hosvd-edge wheel (hosvd_edge-*.whl) or a source directory with pyproject.toml; default: the
# checkout this script is in. Steps, each done only when needed (running it again changes nothing):
#   1. /opt/hosvd-edge/venv: a virtual environment with  pip install 'SOURCE[device]'  ([device-legacy] with
#      --legacy); rebuilt when the Python version or the extra changed
#   2. groups i2c (for /dev/i2c-*) and hosvd-edge (may read the config), if missing
#   3. /etc/hosvd-edge/device.toml from deploy/device.toml.example if absent (root:hosvd-edge 0640, [device]
#      id = host name), then  hosvd-device check-config  on it
#   4. /etc/systemd/system/hosvd-device.service, and a drop-in setting MemoryMax= from [training] ram_ceiling_mb
#   5. systemctl daemon-reload, enable --now (restart when something changed and it was running)
# Dry run: --dry-run prints what would be done and changes nothing.
set -euo pipefail

readonly UNIT=hosvd-device.service
readonly DEFAULT_PREFIX=/opt/hosvd-edge
readonly DEFAULT_ETC=/etc
SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
readonly SCRIPT_DIR
readonly REPO_DIR=${SCRIPT_DIR%/*}

PREFIX=$DEFAULT_PREFIX
ETC_DIR=$DEFAULT_ETC
UNIT_DIR=/etc/systemd/system
PYTHON=python3
EXTRA=device
DRY_RUN=0
SYSTEM=1
DEVICE_ID=
HEADROOM_MB=128
ENABLE_MEMCG=0
PIP_OPTIONS=()
SOURCE=

usage() {
    cat <<'EOF'
Usage: install.sh [options] [SOURCE]

Install the hosvd-edge device daemon as the systemd service hosvd-device.service.
SOURCE: a hosvd-edge wheel or a source directory (default: this checkout).

Options:
  --legacy               install the [device-legacy] extra (tflite-runtime 2.14, numpy<2): Python 3.11 only
  --python PY            interpreter for the virtual environment (default: python3)
  --device-id ID         [device] id for a new config (default: the host name)
  --pip-option OPT       extra pip install option, repeatable (e.g. --pip-option=--no-index
                         --pip-option=--find-links=/srv/wheels for an offline wheelhouse)
  --headroom-mb N        MemoryMax = ram_ceiling_mb + N MiB (default: 128)
  --enable-memory-cgroup add cgroup_enable=memory to the Raspberry Pi kernel command line (needs a reboot)
  --prefix DIR           install root for the venv (default: /opt/hosvd-edge)
  --etc-dir DIR          where hosvd-edge/device.toml goes (default: /etc)
  --unit-dir DIR         where the unit goes (default: /etc/systemd/system)
  --no-system            only write files: no groups, no systemctl, no kernel command line (image builds, tests)
  --dry-run              print what would be done, change nothing
  -h, --help             this text
EOF
}

log() { printf '%s\n' "$*"; }
warn() { printf 'install.sh: warning: %s\n' "$*" >&2; }
die() {
    printf 'install.sh: error: %s\n' "$*" >&2
    exit 1
}

# run CMD...: execute (echoed with a '+'), or only print it in a dry run.
run() {
    if ((DRY_RUN)); then
        printf '[dry-run]'
        printf ' %q' "$@"
        printf '\n'
    else
        printf '+'
        printf ' %q' "$@"
        printf '\n'
        "$@"
    fi
}

CHANGED=0
changed() {
    CHANGED=1
    if ((DRY_RUN)); then log "would change: $*"; else log "changed: $*"; fi
}

# write_file PATH MODE CONTENT: write CONTENT (plus a newline) to PATH if it differs; atomic rename.
write_file() {
    local path=$1 mode=$2 content=$3
    if [[ -f $path && "$(<"$path")" == "$content" ]]; then
        log "unchanged: $path"
        return 0
    fi
    changed "$path"
    if ((DRY_RUN)); then
        local lines
        lines=$(printf '%s\n' "$content" | wc -l)
        printf '[dry-run] write %s (mode %s, %s lines)\n' "$path" "$mode" "$lines"
        if [[ -f $path ]]; then
            diff -u "$path" <(printf '%s\n' "$content") | sed 's/^/[dry-run]   | /' || true
        elif ((lines <= 12)); then
            printf '%s\n' "$content" | sed 's/^/[dry-run]   | /'
        fi
        return 0
    fi
    (umask 077 && printf '%s\n' "$content" >"$path.tmp.$$")
    chmod "$mode" "$path.tmp.$$"
    mv -f "$path.tmp.$$" "$path"
}

need_value() { [[ $# -ge 2 && -n $2 ]] || die "$1 needs a value"; }

while (($#)); do
    case $1 in
        --legacy) EXTRA=device-legacy ;;
        --dry-run) DRY_RUN=1 ;;
        --no-system) SYSTEM=0 ;;
        --enable-memory-cgroup) ENABLE_MEMCG=1 ;;
        --python | --device-id | --pip-option | --headroom-mb | --prefix | --etc-dir | --unit-dir)
            need_value "$@"
            set -- "$1=$2" "${@:3}"
            continue
            ;;
        --python=*) PYTHON=${1#*=} ;;
        --device-id=*) DEVICE_ID=${1#*=} ;;
        --pip-option=*) PIP_OPTIONS+=("${1#*=}") ;;
        --headroom-mb=*) HEADROOM_MB=${1#*=} ;;
        --prefix=*) PREFIX=${1#*=} ;;
        --etc-dir=*) ETC_DIR=${1#*=} ;;
        --unit-dir=*) UNIT_DIR=${1#*=} ;;
        -h | --help)
            usage
            exit 0
            ;;
        -*) die "unknown option $1 (see --help)" ;;
        *)
            [[ -z $SOURCE ]] || die "only one SOURCE, got '$SOURCE' and '$1'"
            SOURCE=$1
            ;;
    esac
    shift
done

[[ $HEADROOM_MB =~ ^[0-9]+$ ]] || die "--headroom-mb must be a whole number of MiB, got '$HEADROOM_MB'"
[[ -z $DEVICE_ID || $DEVICE_ID =~ ^[A-Za-z0-9_-]{1,64}$ ]] ||
    die "--device-id must be 1-64 letters, digits, '_' or '-', got '$DEVICE_ID'"

# --- what to install -----------------------------------------------------------------------------------------
if [[ -z $SOURCE ]]; then
    [[ -f $REPO_DIR/pyproject.toml ]] || die "no SOURCE given and $REPO_DIR is not a hosvd-edge checkout"
    SOURCE=$REPO_DIR
fi
if [[ -d $SOURCE ]]; then
    [[ -f $SOURCE/pyproject.toml ]] || die "$SOURCE is a directory without pyproject.toml"
elif [[ -f $SOURCE ]]; then
    [[ $SOURCE == *.whl ]] || die "$SOURCE is neither a wheel (*.whl) nor a source directory"
else
    die "SOURCE $SOURCE does not exist"
fi
SOURCE=$(cd "$(dirname "$SOURCE")" && pwd)/$(basename "$SOURCE")
SOURCE=${SOURCE%/.}

EXAMPLE=$SCRIPT_DIR/device.toml.example
UNIT_SRC=$REPO_DIR/systemd/$UNIT
[[ -f $EXAMPLE ]] || die "missing $EXAMPLE (run install.sh from a checkout, or copy deploy/ and systemd/)"
[[ -f $UNIT_SRC ]] || die "missing $UNIT_SRC (run install.sh from a checkout, or copy deploy/ and systemd/)"

VENV=$PREFIX/venv
CONF_DIR=$ETC_DIR/hosvd-edge
CONF=$CONF_DIR/device.toml
DROPIN_DIR=$UNIT_DIR/$UNIT.d
DROPIN=$DROPIN_DIR/50-memory.conf
STAMP=$VENV/.hosvd-edge-install

if ((!DRY_RUN && SYSTEM && EUID != 0)); then
    die "run as root (sudo), or use --dry-run to see what would be done"
fi
if ((!DRY_RUN && SYSTEM)) && [[ ! -d /run/systemd/system ]]; then
    die "systemd is not running here (no /run/systemd/system); --no-system only writes the files"
fi
((DRY_RUN)) && log "dry run: nothing will be changed"

case $(uname -m) in
    aarch64 | x86_64) ;;
    *) warn "$(uname -m): ai-edge-litert and tflite-runtime publish 64-bit wheels only (use 64-bit Pi OS)" ;;
esac

# --- 1. virtual environment -------------------------------------------------------------------------------
command -v "$PYTHON" >/dev/null 2>&1 || die "$PYTHON not found (apt-get install python3 python3-venv)"
PY_VERSION=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])') || die "$PYTHON does not run"
case $EXTRA:$PY_VERSION in
    device-legacy:3.11) ;;
    device-legacy:*) die "--legacy needs Python 3.11 (tflite-runtime 2.14 has no wheels for $PY_VERSION); \
drop --legacy to use ai-edge-litert" ;;
    device:3.1[1-9] | device:3.[2-9]?) ;;
    *) die "hosvd-edge needs Python >= 3.11, $PYTHON is $PY_VERSION" ;;
esac
log "python: $PYTHON ($PY_VERSION), extra: [$EXTRA], source: $SOURCE"

WANT_STAMP="python=$PY_VERSION extra=$EXTRA"
NEED_VENV=0
[[ -x $VENV/bin/python ]] || NEED_VENV=1
if ((!NEED_VENV)) && [[ -f $STAMP && "$(<"$STAMP")" != "$WANT_STAMP" ]]; then
    log "venv $VENV was built with '$(<"$STAMP")', want '$WANT_STAMP': rebuilding it"
    run rm -rf "$VENV"
    NEED_VENV=1
fi
# Fingerprint of what the venv holds: the package list plus the file hashes of hosvd-edge itself (a source
# directory installs the same version with new code).
venv_fingerprint() {
    [[ -x $VENV/bin/python ]] || return 0
    {
        "$VENV/bin/python" -m pip freeze --all --disable-pip-version-check 2>/dev/null || true
        cat "$VENV"/lib/python*/site-packages/hosvd_edge-*.dist-info/RECORD 2>/dev/null || true
    } | sha256sum
}
if ((NEED_VENV)); then
    [[ -d $PREFIX ]] || run install -d -m 0755 "$PREFIX"
    run "$PYTHON" -m venv "$VENV" || die "python -m venv failed: on Debian/Pi OS run apt-get install python3-venv"
    changed "$VENV (created)"
fi
BEFORE=
((NEED_VENV)) || BEFORE=$(venv_fingerprint)
run "$VENV/bin/python" -m pip install --disable-pip-version-check ${PIP_OPTIONS[@]+"${PIP_OPTIONS[@]}"} \
    "${SOURCE}[$EXTRA]"
if ((!DRY_RUN)); then
    [[ "$(venv_fingerprint)" == "$BEFORE" ]] || changed "$VENV (packages)"
    [[ -f $STAMP && "$(<"$STAMP")" == "$WANT_STAMP" ]] || printf '%s\n' "$WANT_STAMP" >"$STAMP"
fi

# --- 2. groups ----------------------------------------------------------------------------------------------
for group in i2c hosvd-edge; do
    if ((!SYSTEM)); then
        log "skipped (--no-system): group $group"
    elif ! getent group "$group" >/dev/null; then
        run groupadd --system "$group"
        changed "group $group"
    fi
done

# --- 3. configuration ---------------------------------------------------------------------------------------
if [[ ! -d $CONF_DIR ]]; then
    run install -d -m 0755 "$CONF_DIR"
fi
if [[ -e $CONF ]]; then
    log "kept existing $CONF"
else
    if [[ -z $DEVICE_ID ]]; then
        DEVICE_ID=$(hostname -s 2>/dev/null || hostname)
        DEVICE_ID=$(printf '%s' "$DEVICE_ID" | tr -c 'A-Za-z0-9_-' '-' | cut -c1-64)
    fi
    grep -q '^id = "pi-01"$' "$EXAMPLE" || die "$EXAMPLE has no line id = \"pi-01\" to replace"
    write_file "$CONF" 0640 "$(sed "s/^id = \"pi-01\"\$/id = \"$DEVICE_ID\"/" "$EXAMPLE")"
    log "config: [device] id = \"$DEVICE_ID\"; set [mqtt] host and [model] bundle in $CONF"
    # The service reads it through SupplementaryGroups=hosvd-edge (in a dry run the group is not made yet).
    if getent group hosvd-edge >/dev/null || ((DRY_RUN && SYSTEM)); then
        run chgrp hosvd-edge "$CONF"
    fi
fi
CONF_FOR_READ=$CONF
[[ -e $CONF ]] || CONF_FOR_READ=$EXAMPLE # dry run before the first install
if ((!DRY_RUN)); then
    "$VENV/bin/hosvd-device" check-config "$CONF" || die "$CONF is invalid (see above): fix it and run again"
    if ((SYSTEM)) && [[ "$(stat -c %G "$CONF")" != hosvd-edge ]]; then
        warn "the service reads $CONF as group hosvd-edge: chgrp hosvd-edge $CONF && chmod 0640 $CONF"
    fi
else
    run "$VENV/bin/hosvd-device" check-config "$CONF"
fi

# --- 4. unit and memory drop-in -----------------------------------------------------------------------------
UNIT_TEXT=$(<"$UNIT_SRC")
DEFAULT_EXEC="$DEFAULT_PREFIX/venv/bin/hosvd-device run --config $DEFAULT_ETC/hosvd-edge/device.toml"
[[ $UNIT_TEXT == *"ExecStart=$DEFAULT_EXEC"* ]] || die "$UNIT_SRC: no line ExecStart=$DEFAULT_EXEC"
UNIT_TEXT=${UNIT_TEXT//"ExecStart=$DEFAULT_EXEC"/"ExecStart=$VENV/bin/hosvd-device run --config $CONF"}
[[ -d $UNIT_DIR ]] || run install -d -m 0755 "$UNIT_DIR"
write_file "$UNIT_DIR/$UNIT" 0644 "$UNIT_TEXT"

read_py=$PYTHON
[[ -x $VENV/bin/python ]] && read_py=$VENV/bin/python
CEILING_MB=$("$read_py" - "$CONF_FOR_READ" <<'EOF'
import sys, tomllib
with open(sys.argv[1], "rb") as f:
    value = tomllib.load(f).get("training", {}).get("ram_ceiling_mb", 0)
print(int(value))
EOF
)
if ((CEILING_MB > 0)); then
    MEMORY_MAX=$((CEILING_MB + HEADROOM_MB))
    [[ -d $DROPIN_DIR ]] || run install -d -m 0755 "$DROPIN_DIR"
    write_file "$DROPIN" 0644 "# Written by deploy/install.sh: [training] ram_ceiling_mb = $CEILING_MB in $CONF, plus ${HEADROOM_MB} MiB
# for page cache and kernel memory. Run install.sh again after changing ram_ceiling_mb.
[Service]
MemoryMax=${MEMORY_MAX}M"
    log "memory: ram_ceiling_mb = $CEILING_MB -> MemoryMax=${MEMORY_MAX}M"
elif [[ -e $DROPIN ]]; then
    log "memory: ram_ceiling_mb = 0 (no ceiling): removing $DROPIN, the unit's own MemoryMax= applies"
    run rm -f "$DROPIN"
    changed "$DROPIN (removed)"
else
    log "memory: ram_ceiling_mb = 0 (no ceiling): the unit's own MemoryMax= applies"
fi

# --- 5. kernel memory cgroup and systemd --------------------------------------------------------------------
finish() {
    if ((CHANGED)); then log "done (changed)"; else log "done (nothing changed)"; fi
    exit 0
}
if ((!SYSTEM)); then
    log "skipped (--no-system): memory cgroup check, systemctl daemon-reload / enable --now $UNIT"
    finish
fi

if [[ -r /sys/fs/cgroup/cgroup.controllers ]] && ! grep -qw memory /sys/fs/cgroup/cgroup.controllers; then
    CMDLINE=/boot/firmware/cmdline.txt
    [[ -f $CMDLINE ]] || CMDLINE=/boot/cmdline.txt
    if ((ENABLE_MEMCG)) && [[ -f $CMDLINE ]]; then
        if grep -qw 'cgroup_enable=memory' "$CMDLINE"; then
            warn "cgroup_enable=memory is in $CMDLINE but not active yet: reboot"
        else
            run sed -i '1 s/$/ cgroup_enable=memory/' "$CMDLINE"
            changed "$CMDLINE (cgroup_enable=memory)"
            warn "reboot for the memory cgroup: until then MemoryMax= is not enforced"
        fi
    else
        warn "the memory cgroup controller is off: MemoryMax= is NOT enforced. Add cgroup_enable=memory to \
the end of the line in $CMDLINE and reboot (or run again with --enable-memory-cgroup)"
    fi
fi

command -v systemctl >/dev/null 2>&1 || die "systemctl not found: is this a systemd system?"
run systemctl daemon-reload
if systemctl is-active --quiet "$UNIT" 2>/dev/null; then
    run systemctl enable "$UNIT"
    if ((CHANGED)); then
        run systemctl restart "$UNIT"
    else
        log "$UNIT is running and nothing changed: not restarting"
    fi
else
    run systemctl enable --now "$UNIT"
fi
finish
