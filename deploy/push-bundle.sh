#!/usr/bin/env bash
# Copy a training bundle (made by hosvd-convert) to a device and ask its daemon to load it.
#
#   deploy/push-bundle.sh DEVICE_HOST BUNDLE_DIR [--name NAME] [--broker HOST --device-id ID] [options]
#   deploy/push-bundle.sh --local BUNDLE_DIR ...     (on the device itself, e.g. from the Ansible role)
#
# 1. copies BUNDLE_DIR over ssh (rsync when both ends have it, else tar) into a temporary directory inside the
#    device's bundles directory (/var/lib/hosvd-edge/bundles), makes it readable by the service and flushes it
#    to disk;
# 2. renames it to NAME in one step: rename(2) when NAME is new, renameat2(RENAME_EXCHANGE) when NAME exists
#    (the daemon never sees a half-copied bundle);
# 3. with --broker and --device-id: publishes {"bundle": NAME, "transaction": ...} to
#    <base>/<device_id>/request/reload with mosquitto_pub and waits for the answer with the same transaction
#    on <base>/<device_id>/response/reload (mosquitto_sub -W); exits 0 only on "status": "ok".
#
# The remote user must be root or may run sudo without a password (sudo -n). Environment:
#   HOSVD_SSH             ssh command (default: ssh -o BatchMode=yes); also used by rsync -e
#   HOSVD_REMOTE_SUDO     command prefix for the remote side; default: sudo -n unless the remote user is root
#   HOSVD_MQTT_PASSWORD   broker password for --username
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: push-bundle.sh DEVICE_HOST BUNDLE_DIR [options]
       push-bundle.sh --local BUNDLE_DIR [options]

Copy BUNDLE_DIR (with manifest.json and model.tflite) to DEVICE_HOST and, with --broker and --device-id,
ask the daemon to reload it over MQTT.

Options:
  --local              install on this machine (no ssh): the script runs on the device
  --name NAME          bundle name on the device (default: the directory name of BUNDLE_DIR)
  --bundles-dir DIR    bundles directory on the device (default: /var/lib/hosvd-edge/bundles)
  --broker HOST        MQTT broker to send the reload request through
  --device-id ID       the daemon's [device] id
  --port N             broker port (default: 1883, or 8883 with --cafile)
  --base-topic TOPIC   first topic level (default: hosvd-edge)
  --username USER      broker user name; the password comes from HOSVD_MQTT_PASSWORD
  --cafile FILE        connect with TLS, verifying the broker against this CA
  --timeout SECONDS    how long to wait for the reload response (default: 60)
  -h, --help           this text
EOF
}

die() {
    printf 'push-bundle.sh: error: %s\n' "$*" >&2
    exit 1
}
log() { printf '%s\n' "$*"; }

HOST=
LOCAL=0
BUNDLE_DIR=
NAME=
BUNDLES_DIR=/var/lib/hosvd-edge/bundles
BROKER=
DEVICE_ID=
PORT=
BASE_TOPIC=hosvd-edge
MQTT_USER=
CAFILE=
TIMEOUT=60

while (($#)); do
    case $1 in
        --name | --bundles-dir | --broker | --device-id | --port | --base-topic | --username | --cafile | --timeout)
            [[ $# -ge 2 && -n $2 ]] || die "$1 needs a value"
            set -- "$1=$2" "${@:3}"
            continue
            ;;
        --name=*) NAME=${1#*=} ;;
        --bundles-dir=*) BUNDLES_DIR=${1#*=} ;;
        --broker=*) BROKER=${1#*=} ;;
        --device-id=*) DEVICE_ID=${1#*=} ;;
        --port=*) PORT=${1#*=} ;;
        --base-topic=*) BASE_TOPIC=${1#*=} ;;
        --username=*) MQTT_USER=${1#*=} ;;
        --cafile=*) CAFILE=${1#*=} ;;
        --timeout=*) TIMEOUT=${1#*=} ;;
        --local) LOCAL=1 ;;
        -h | --help)
            usage
            exit 0
            ;;
        -*) die "unknown option $1 (see --help)" ;;
        *)
            if [[ -z $HOST ]] && ((!LOCAL)); then
                HOST=$1
            elif [[ -z $BUNDLE_DIR ]]; then
                BUNDLE_DIR=$1
            else
                die "unexpected argument $1 (see --help)"
            fi
            ;;
    esac
    shift
done

if ((LOCAL)) && [[ -n $HOST && -z $BUNDLE_DIR ]]; then # --local given after the first argument
    BUNDLE_DIR=$HOST
    HOST=
fi
((LOCAL)) && [[ -n $HOST ]] && die "--local takes no DEVICE_HOST"
((LOCAL)) && HOST=localhost
[[ -n $HOST && -n $BUNDLE_DIR ]] || {
    usage >&2
    exit 2
}
[[ -d $BUNDLE_DIR ]] || die "$BUNDLE_DIR is not a directory"
for file in manifest.json model.tflite; do
    [[ -f $BUNDLE_DIR/$file ]] || die "$BUNDLE_DIR has no $file: not a bundle made by hosvd-convert"
done
BUNDLE_DIR=$(cd "$BUNDLE_DIR" && pwd)
[[ -n $NAME ]] || NAME=${BUNDLE_DIR##*/}
# The daemon's rule for bundle names ([model] bundle and reload requests).
[[ $NAME =~ ^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$ ]] ||
    die "bundle name must match [A-Za-z0-9][A-Za-z0-9_.-]{0,63} (the daemon's rule), got '$NAME'"
[[ $BUNDLES_DIR =~ ^/[A-Za-z0-9_./-]+$ ]] ||
    die "--bundles-dir must be an absolute path of letters, digits and _ . / -, got '$BUNDLES_DIR'"
if [[ -n $BROKER || -n $DEVICE_ID ]]; then
    [[ -n $BROKER && -n $DEVICE_ID ]] || die "--broker and --device-id go together"
    [[ $DEVICE_ID =~ ^[A-Za-z0-9_-]{1,64}$ ]] || die "--device-id must be 1-64 letters, digits, _ or -"
    [[ $TIMEOUT =~ ^[1-9][0-9]*$ ]] || die "--timeout must be a whole number of seconds, got '$TIMEOUT'"
    for tool in mosquitto_pub mosquitto_sub; do
        command -v "$tool" >/dev/null 2>&1 || die "$tool not found (apt-get install mosquitto-clients)"
    done
fi

read -r -a SSH <<<"${HOSVD_SSH:-ssh -o BatchMode=yes}"

# The device side, sent over ssh to `sh -s`: POSIX sh, one action per call.
REMOTE_SCRIPT=$(
    cat <<'EOF'
set -eu
action=$1 bundles=$2 name=$3 tmp=${4:-}
exchange() { # atomically swap two directories: renameat2(AT_FDCWD, a, AT_FDCWD, b, RENAME_EXCHANGE)
    for py in python3 /opt/hosvd-edge/venv/bin/python; do
        command -v "$py" >/dev/null 2>&1 || continue
        "$py" -c 'import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
a, b = (os.fsencode(p) for p in sys.argv[1:3])
sys.exit(0 if libc.renameat2(-100, a, -100, b, 2) == 0 else 1)' "$1" "$2" && return 0
        return 1
    done
    return 1
}
case $action in
    probe)
        id -u
        if command -v rsync >/dev/null 2>&1; then echo rsync; else echo tar; fi
        ;;
    prepare)
        mkdir -p "$bundles"
        mktemp -d "$bundles/.incoming-$name.XXXXXX"
        ;;
    commit)
        chmod -R u=rwX,go=rX "$tmp"
        chown -R --reference="$bundles" "$tmp"
        sync
        if [ -e "$bundles/$name" ] || [ -L "$bundles/$name" ]; then
            if exchange "$tmp" "$bundles/$name"; then
                rm -rf "$tmp"
            else
                old=$bundles/.replaced-$name.$$
                mv -T "$bundles/$name" "$old"
                mv -T "$tmp" "$bundles/$name"
                rm -rf "$old"
            fi
        else
            mv -T "$tmp" "$bundles/$name"
        fi
        sync
        ;;
    abort)
        rm -rf "$tmp"
        ;;
esac
EOF
)

# on_device COMMAND-STRING: run a shell command line on the device (over ssh, or here with --local).
on_device() {
    if ((LOCAL)); then
        sh -c "$1"
    else
        "${SSH[@]}" "$HOST" "$1"
    fi
}

# remote SUDO ACTION [TMP]: run one action of REMOTE_SCRIPT on the device.
remote() {
    local sudo=$1
    shift
    local cmd
    cmd=$(printf ' %q' sh -s -- "$1" "$BUNDLES_DIR" "$NAME" "${@:2}")
    on_device "${sudo:+$sudo }${cmd# }" <<<"$REMOTE_SCRIPT"
}

probe=$(remote "" probe "") || die "cannot run commands on $HOST over ssh (${SSH[*]})"
remote_uid=${probe%%$'\n'*}
transport=${probe##*$'\n'}
if [[ -n ${HOSVD_REMOTE_SUDO+set} ]]; then
    SUDO=$HOSVD_REMOTE_SUDO
elif [[ $remote_uid == 0 ]]; then
    SUDO=
else
    SUDO="sudo -n"
fi
command -v rsync >/dev/null 2>&1 || transport=tar

TMP_DIR=$(remote "$SUDO" prepare "") || die "cannot create a directory in $BUNDLES_DIR on $HOST"
[[ $TMP_DIR == "$BUNDLES_DIR/.incoming-$NAME."* ]] || die "unexpected answer from $HOST: $TMP_DIR"
committed=0
# shellcheck disable=SC2317 # called from the EXIT trap
cleanup() {
    if ((!committed)); then
        remote "$SUDO" abort "$TMP_DIR" || printf 'push-bundle.sh: could not remove %s on %s\n' "$TMP_DIR" "$HOST" >&2
    fi
}
trap cleanup EXIT

log "copying $BUNDLE_DIR to $HOST:$TMP_DIR ($transport)"
if [[ $transport == rsync ]] && ((LOCAL)); then
    on_device "${SUDO:+$SUDO }rsync -a --delete $(printf '%q/ %q/' "$BUNDLE_DIR" "$TMP_DIR")"
elif [[ $transport == rsync ]]; then
    rsync_opts=(-a --delete -e "${SSH[*]}")
    [[ -z $SUDO ]] || rsync_opts+=(--rsync-path="$SUDO rsync")
    rsync "${rsync_opts[@]}" "$BUNDLE_DIR/" "$HOST:$TMP_DIR/"
else
    tar -C "$BUNDLE_DIR" -cf - . |
        on_device "${SUDO:+$SUDO }tar -C $(printf '%q' "$TMP_DIR") --no-same-owner -xf -"
fi
remote "$SUDO" commit "$TMP_DIR"
committed=1
log "installed bundle '$NAME' in $HOST:$BUNDLES_DIR/$NAME"

if [[ -z $BROKER ]]; then
    log "not asking for a reload (no --broker/--device-id): the daemon loads '$NAME' at its next start or reload"
    exit 0
fi

# --- reload over MQTT ---------------------------------------------------------------------------------------
mqtt=(-h "$BROKER")
if [[ -n $CAFILE ]]; then
    [[ -f $CAFILE ]] || die "--cafile $CAFILE does not exist"
    mqtt+=(--cafile "$CAFILE" -p "${PORT:-8883}")
else
    mqtt+=(-p "${PORT:-1883}")
fi
[[ -z $MQTT_USER ]] || mqtt+=(-u "$MQTT_USER")
[[ -z ${HOSVD_MQTT_PASSWORD:-} ]] || mqtt+=(-P "$HOSVD_MQTT_PASSWORD")

txn="push-$NAME-$(date +%s)-$$-$RANDOM"
prefix=$BASE_TOPIC/$DEVICE_ID
request_topic=$prefix/request/reload
response_topic=$prefix/response/reload
probe_topic=$prefix/push-bundle/$txn

# Subscribe first (to the response and to a private probe topic), and publish only once a probe came back:
# then the subscription is live and the response cannot be missed.
coproc SUB { exec mosquitto_sub "${mqtt[@]}" -q 1 -v -W "$((TIMEOUT + 10))" -t "$response_topic" -t "$probe_topic"; }
exec {sub_out}<&"${SUB[0]}"
# shellcheck disable=SC2153 # SUB_PID is set by coproc
sub_pid=$SUB_PID
trap 'cleanup; kill "$sub_pid" 2>/dev/null || true' EXIT

subscribed=0
for _ in $(seq 20); do
    mosquitto_pub "${mqtt[@]}" -q 1 -t "$probe_topic" -m probe || die "cannot publish to $BROKER"
    if read -r -t 0.5 line <&"$sub_out" && [[ $line == "$probe_topic probe" ]]; then
        subscribed=1
        break
    fi
done
((subscribed)) || die "no subscription to $response_topic on $BROKER (check --broker/--port/credentials)"

payload=$(printf '{"bundle": "%s", "transaction": "%s"}' "$NAME" "$txn")
log "publishing $request_topic $payload"
mosquitto_pub "${mqtt[@]}" -q 1 -t "$request_topic" -m "$payload"

deadline=$((SECONDS + TIMEOUT))
while ((SECONDS < deadline)); do
    read -r -t "$((deadline - SECONDS))" line <&"$sub_out" || break
    [[ $line == "$response_topic "* ]] || continue
    answer=${line#"$response_topic "}
    [[ $answer == *"\"$txn\""* ]] || continue # another client's request
    log "response: $answer"
    if [[ $answer =~ \"status\"[[:space:]]*:[[:space:]]*\"ok\" ]]; then
        log "device $DEVICE_ID reloaded bundle '$NAME'"
        exit 0
    fi
    die "device $DEVICE_ID refused to reload '$NAME' (the bundle is on the device; see the error above)"
done
die "no response on $response_topic within ${TIMEOUT}s: is the daemon running and connected to $BROKER?"
