#!/usr/bin/env bash
# A private SoftHSM 2 token under DIR, for development and tests. Never touches the system
# token directory (/var/lib/softhsm/tokens): everything lives under DIR.
#
#   scripts/softhsm.sh start DIR   # DIR/softhsm2.conf, DIR/tokens/, a token with random PINs
#   scripts/softhsm.sh env DIR     # print eval-able `export ...` lines for that token
#   scripts/softhsm.sh stop DIR    # delete the token state (tokens/, conf, PIN files)
#
#   eval "$(scripts/softhsm.sh env /tmp/hsm)"
#
# start is idempotent: a second start finds the token (by label) and changes nothing.
# Files under DIR:
#   softhsm2.conf   directories.tokendir = DIR/tokens, objectstore.backend = file, log.level = ERROR
#   tokens/         the token's objects (SoftHSM's file store)
#   so-pin          the Security Officer PIN (random, mode 0600)
#   user-pin        the user PIN (random, mode 0600); keyward reads it as `pin = "file:DIR/user-pin"`
#
# Environment:
#   KEYWARD_TOKEN_LABEL    token label (default: keyward)
#   KEYWARD_PKCS11_MODULE  the SoftHSM module (default: /usr/lib/softhsm/libsofthsm2.so)
#
# Note: softhsm2-util takes the PINs as arguments only, so they are visible in the process list
# for the moment `start` initialises the token. These are throw-away test tokens; keyward itself
# never takes a PIN from argv.
set -euo pipefail

readonly SYSTEM_TOKENDIR=/var/lib/softhsm/tokens
LABEL=${KEYWARD_TOKEN_LABEL:-keyward}
MODULE=${KEYWARD_PKCS11_MODULE:-/usr/lib/softhsm/libsofthsm2.so}

die() {
    printf 'softhsm.sh: %s\n' "$*" >&2
    exit 1
}

usage() {
    sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

# A random PIN: 24 hex digits from the kernel's CSPRNG.
random_pin() {
    od -An -tx1 -N12 /dev/urandom | tr -d ' \n'
}

# Absolute path of DIR (which need not exist yet), refusing the system token directory.
resolve_dir() {
    local d=$1
    [[ -n $d ]] || die "DIR is empty"
    d=$(realpath -m -- "$d")
    case "$d" in
        / | "$SYSTEM_TOKENDIR" | "$SYSTEM_TOKENDIR"/* | /var/lib/softhsm)
            die "refusing to use $d (the system SoftHSM directories)"
            ;;
    esac
    printf '%s\n' "$d"
}

# Whether the token with $LABEL exists in DIR's token store.
has_token() {
    local conf=$1
    SOFTHSM2_CONF=$conf softhsm2-util --show-slots 2>/dev/null |
        awk -v want="$LABEL" '
            /^[[:space:]]*Label:/ {
                sub(/^[[:space:]]*Label:[[:space:]]*/, "")
                sub(/[[:space:]]+$/, "")
                if ($0 == want) found = 1
            }
            END { exit found ? 0 : 1 }'
}

write_conf() {
    local dir=$1
    # Rewritten on every start with the same content (idempotent), atomically.
    cat >"$dir/softhsm2.conf.tmp" <<EOF
# Private SoftHSM configuration written by keyward's scripts/softhsm.sh.
directories.tokendir = $dir/tokens
objectstore.backend = file
log.level = ERROR
EOF
    mv -f "$dir/softhsm2.conf.tmp" "$dir/softhsm2.conf"
}

# Create a 0600 PIN file unless it exists (the PINs of an existing token must not change).
ensure_pin() {
    local file=$1
    if [[ -s $file ]]; then
        chmod 600 "$file"
        return
    fi
    (
        umask 077
        random_pin >"$file.tmp"
    )
    mv -f "$file.tmp" "$file"
}

cmd_start() {
    local dir conf
    dir=$(resolve_dir "$1")
    command -v softhsm2-util >/dev/null || die "softhsm2-util not found (apt-get install softhsm2)"
    [[ -f $MODULE ]] || die "SoftHSM module $MODULE not found (apt-get install softhsm2)"
    umask 077
    mkdir -p "$dir/tokens"
    chmod 700 "$dir" "$dir/tokens"
    conf=$dir/softhsm2.conf
    write_conf "$dir"
    if has_token "$conf"; then
        [[ -s $dir/so-pin && -s $dir/user-pin ]] ||
            die "token '$LABEL' exists in $dir/tokens but its PIN files are missing; run: $0 stop $dir"
        printf 'softhsm.sh: token %s already initialised in %s\n' "$LABEL" "$dir/tokens" >&2
        return
    fi
    ensure_pin "$dir/so-pin"
    ensure_pin "$dir/user-pin"
    SOFTHSM2_CONF=$conf softhsm2-util --init-token --free --label "$LABEL" \
        --so-pin "$(cat "$dir/so-pin")" --pin "$(cat "$dir/user-pin")" >/dev/null ||
        die "softhsm2-util --init-token failed"
    has_token "$conf" || die "token '$LABEL' not found after initialisation"
    printf 'softhsm.sh: token %s initialised in %s\n' "$LABEL" "$dir/tokens" >&2
}

cmd_env() {
    local dir
    dir=$(resolve_dir "$1")
    [[ -f $dir/softhsm2.conf ]] || die "no SoftHSM set-up in $dir; run: $0 start $dir"
    printf 'export SOFTHSM2_CONF=%q\n' "$dir/softhsm2.conf"
    printf 'export KEYWARD_PKCS11_MODULE=%q\n' "$MODULE"
    printf 'export KEYWARD_TOKEN_LABEL=%q\n' "$LABEL"
    printf 'export KEYWARD_TOKEN_PIN=%q\n' "file:$dir/user-pin"
    printf 'export KEYWARD_TOKEN_PIN_FILE=%q\n' "$dir/user-pin"
    printf 'export KEYWARD_TOKEN_SO_PIN_FILE=%q\n' "$dir/so-pin"
}

cmd_stop() {
    local dir
    dir=$(resolve_dir "$1")
    [[ -d $dir ]] || return 0
    # Only what start created; DIR itself goes only if nothing else is in it.
    rm -rf -- "$dir/tokens"
    rm -f -- "$dir/softhsm2.conf" "$dir/softhsm2.conf.tmp" "$dir/so-pin" "$dir/user-pin" \
        "$dir/so-pin.tmp" "$dir/user-pin.tmp"
    rmdir -- "$dir" 2>/dev/null || true
}

[[ $# -eq 2 ]] || usage
case "$1" in
    start) cmd_start "$2" ;;
    env) cmd_env "$2" ;;
    stop) cmd_stop "$2" ;;
    *) usage ;;
esac
