#!/usr/bin/env bash
# A private software TPM 2.0 (swtpm) under DIR, for development and tests.
#
#   scripts/swtpm.sh start DIR   # start swtpm on 127.0.0.1 (free ports); prints the TCTI
#   scripts/swtpm.sh env DIR     # print eval-able `export ...` lines for that TPM
#   scripts/swtpm.sh stop DIR    # stop it; the TPM state stays (start resumes the same TPM)
#
#   eval "$(scripts/swtpm.sh env /tmp/tpm)"; tpm2_getcap properties-fixed
#
# start is idempotent: while the TPM of DIR runs, start prints its TCTI and changes nothing.
# A later start reuses the recorded port when it is free, so a TCTI written into a config keeps
# working across restarts; `rm -rf DIR` after stop discards the TPM (its seeds and every key).
# Files under DIR:
#   state/      the TPM's NVRAM (swtpm --tpmstate): seeds, persistent objects, DA counters
#   port        the server port P (the control channel is P+1, as the swtpm TCTI expects)
#   pid         swtpm's pid file
#   swtpm.log   swtpm's log
#
# The TPM is started with `--flags not-need-init,startup-clear`: ready for commands at once,
# like a TPM after boot. Output: the TCTI string `swtpm:host=127.0.0.1,port=P` on stdout.
set -euo pipefail

readonly HOST=127.0.0.1
# Ports are drawn from this range; both P and P+1 must be free. Kept below the kernel's
# ephemeral range (32768+) so outgoing connections cannot take them between tries.
readonly PORT_MIN=20000
readonly PORT_MAX=32000
readonly TRIES=40

die() {
    printf 'swtpm.sh: %s\n' "$*" >&2
    exit 1
}

usage() {
    sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

resolve_dir() {
    local d=$1
    [[ -n $d ]] || die "DIR is empty"
    d=$(realpath -m -- "$d")
    [[ $d != / ]] || die "refusing to use /"
    printf '%s\n' "$d"
}

# The pid of the swtpm serving DIR, if it runs (a stale pid file or a reused pid is ignored:
# the process must be swtpm with DIR's state directory on its command line).
running_pid() {
    local dir=$1 pid cmdline
    [[ -s $dir/pid ]] || return 1
    pid=$(tr -dc '0-9' <"$dir/pid")
    [[ -n $pid && -r /proc/$pid/cmdline ]] || return 1
    cmdline=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null) || return 1
    [[ $cmdline == *swtpm* && $cmdline == *"dir=$dir/state "* ]] || return 1
    printf '%s\n' "$pid"
}

tcti_of() {
    printf 'swtpm:host=%s,port=%s\n' "$HOST" "$1"
}

# Whether something listens on TCP port $1 of $HOST (only a hint: the real test is bind).
port_busy() {
    ss -Htln "sport = :$1" 2>/dev/null | grep -q .
}

random_port() {
    local span=$(((PORT_MAX - PORT_MIN) / 2))
    # An even port, so P and P+1 are an aligned pair.
    printf '%s\n' $((PORT_MIN + 2 * ($(od -An -tu4 -N4 /dev/urandom | tr -d ' ') % span)))
}

# Try to start swtpm on port $2 (control $2+1). swtpm binds both sockets before it
# daemonises, so a port taken by someone else makes it exit non-zero here.
try_start() {
    local dir=$1 port=$2
    swtpm socket --tpm2 \
        --server "type=tcp,port=$port,bindaddr=$HOST" \
        --ctrl "type=tcp,port=$((port + 1)),bindaddr=$HOST" \
        --tpmstate "dir=$dir/state" \
        --flags not-need-init,startup-clear \
        --pid "file=$dir/pid" \
        --log "file=$dir/swtpm.log" \
        --daemon 2>>"$dir/swtpm.log"
}

cmd_start() {
    local dir pid port candidates=() i
    dir=$(resolve_dir "$1")
    command -v swtpm >/dev/null || die "swtpm not found (apt-get install swtpm swtpm-tools)"
    umask 077
    mkdir -p "$dir/state"
    chmod 700 "$dir" "$dir/state"
    if pid=$(running_pid "$dir"); then
        [[ -s $dir/port ]] || die "swtpm $pid runs on $dir but $dir/port is missing; stop it first"
        printf 'swtpm.sh: already running (pid %s)\n' "$pid" >&2
        tcti_of "$(cat "$dir/port")"
        return
    fi
    rm -f -- "$dir/pid"
    # The recorded port first (a stable TCTI across restarts), then random ones.
    if [[ -s $dir/port ]]; then
        candidates+=("$(tr -dc '0-9' <"$dir/port")")
    fi
    for ((i = 0; i < TRIES; i++)); do
        candidates+=("$(random_port)")
    done
    for port in "${candidates[@]}"; do
        [[ -n $port ]] || continue
        if port_busy "$port" || port_busy $((port + 1)); then
            continue
        fi
        if try_start "$dir" "$port"; then
            printf '%s\n' "$port" >"$dir/port.tmp"
            mv -f "$dir/port.tmp" "$dir/port"
            running_pid "$dir" >/dev/null || die "swtpm started but is not running (see $dir/swtpm.log)"
            printf 'swtpm.sh: started (pid %s, state %s)\n' "$(running_pid "$dir")" "$dir/state" >&2
            tcti_of "$port"
            return
        fi
    done
    die "no free port pair found after ${#candidates[@]} tries (see $dir/swtpm.log)"
}

cmd_env() {
    local dir port
    dir=$(resolve_dir "$1")
    [[ -s $dir/port ]] || die "no swtpm set-up in $dir; run: $0 start $dir"
    port=$(cat "$dir/port")
    running_pid "$dir" >/dev/null || printf 'swtpm.sh: warning: swtpm of %s is not running\n' "$dir" >&2
    printf "export TPM2TOOLS_TCTI='%s'\n" "$(tcti_of "$port")"
    printf "export KEYWARD_TPM_TCTI='%s'\n" "$(tcti_of "$port")"
    printf 'export KEYWARD_TPM_STATE=%q\n' "$dir/state"
}

cmd_stop() {
    local dir pid i
    dir=$(resolve_dir "$1")
    pid=$(running_pid "$dir") || {
        rm -f -- "$dir/pid"
        return 0
    }
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do
        [[ -d /proc/$pid ]] || break
        sleep 0.1
    done
    if [[ -d /proc/$pid ]]; then
        kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f -- "$dir/pid"
}

[[ $# -eq 2 ]] || usage
case "$1" in
    start) cmd_start "$2" ;;
    env) cmd_env "$2" ;;
    stop) cmd_stop "$2" ;;
    *) usage ;;
esac
