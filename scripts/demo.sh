#!/usr/bin/env bash
# keyward in two minutes: build, create a throw-away home, make and import keys, start the
# agent, sign through its socket, and check every signature with tools that are not keyward
# (openssl, stock age). Exits non-zero if any check fails. Leaves nothing behind.
#
#   scripts/demo.sh
#
# KEYWARD_DEMO_SKIP_SETUP=1 skips scripts/setup.sh (when you know the build is current).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

if [ "${KEYWARD_DEMO_SKIP_SETUP:-0}" != 1 ]; then
    bash scripts/setup.sh
fi

KW="$ROOT/target/release/keyward"
[ -x "$KW" ] || {
    echo "demo: $KW is missing; run scripts/setup.sh" >&2
    exit 1
}
for tool in openssl python3; do
    command -v "$tool" >/dev/null 2>&1 || {
        echo "demo: $tool is missing; run scripts/setup.sh" >&2
        exit 1
    }
done

# ----------------------------------------------------------------------------------------------
# Presentation helpers
# ----------------------------------------------------------------------------------------------
if [ -t 1 ]; then
    B=$'\e[1m' G=$'\e[32m' R=$'\e[31m' D=$'\e[2m' N=$'\e[0m'
else
    B='' G='' R='' D='' N=''
fi
STEP=0
section() {
    STEP=$((STEP + 1))
    printf '\n%s%d. %s%s\n' "$B" "$STEP" "$*" "$N"
}
say() { printf '   %s\n' "$*"; }
indent() { sed 's/^/      /'; }
ok() { printf '   %sverified: OK%s  %s\n' "$G" "$N" "$*"; }
fail() {
    printf '\n   %sFAILED:%s %s\n' "$R" "$N" "$*" >&2
    exit 1
}

# Every keyward call goes through here: it shows the command (as a user would type it), then
# runs it against the demo home. Output goes to stdout for the caller to capture or show.
show_cmd() {
    local a out="keyward"
    for a in "$@"; do
        a=${a//"$WORK"/"\$DEMO"}
        case $a in
        *[[:space:]\'\"\;\&\|\<\>\(\)]*) out+=" '${a//\'/\'\\\'\'}'" ;;
        *) out+=" $a" ;;
        esac
    done
    printf '   %s$ %s%s\n' "$D" "$out" "$N" >&2
}
kw() {
    show_cmd "$@"
    "$KW" --home "$H" "$@"
}
# The same, quietly (for values the script needs, e.g. JSON it parses).
kwq() { "$KW" --home "$H" "$@"; }

json_field() { # json_field FIELD < json
    python3 -c 'import json,sys; v=json.load(sys.stdin).get(sys.argv[1]); print("" if v is None else v)' "$1"
}

# ----------------------------------------------------------------------------------------------
# A throw-away home, a private socket and a passphrase file; removed on exit, agent stopped.
# ----------------------------------------------------------------------------------------------
WORK=$(mktemp -d "${TMPDIR:-/tmp}/keyward-demo.XXXXXX")
chmod 700 "$WORK"
H="$WORK/home"
P="$WORK/passphrase"
export KEYWARD_SOCK="$WORK/agent.sock"
unset KEYWARD_HOME
AGENT_PID=""
AGENT_STARTED=0

agent_alive() { [ -n "$AGENT_PID" ] && kill -0 "$AGENT_PID" 2>/dev/null; }

stop_agent() {
    if [ -z "$AGENT_PID" ] && [ "$AGENT_STARTED" = 1 ]; then
        AGENT_PID=$(kwq --json status 2>/dev/null | json_field pid 2>/dev/null || true)
    fi
    agent_alive || return 0
    kill -TERM "$AGENT_PID" 2>/dev/null || true
    for _ in $(seq 1 100); do
        agent_alive || return 0
        sleep 0.1
    done
    echo "demo: agent $AGENT_PID did not stop within 10 s of SIGTERM; sending SIGKILL" >&2
    kill -KILL "$AGENT_PID" 2>/dev/null || true
    return 1
}

cleanup() {
    local rc=$?
    set +e
    if [ "$rc" -ne 0 ] && [ -f "$H/agent.log" ]; then
        echo "--- last lines of the agent log ($H/agent.log) ---" >&2
        tail -n 20 "$H/agent.log" >&2
    fi
    stop_agent
    # The SoftHSM part's testenv agent, if the demo stopped half-way through it.
    [ -f "$WORK/te/testenv.json" ] && "$KW" testenv down --dir "$WORK/te" >/dev/null 2>&1
    rm -rf "$WORK"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

printf '%skeyward demo%s  (%s)\n' "$B" "$N" "$("$KW" --version 2>/dev/null || echo keyward)"
say "scratch directory: DEMO=$WORK (deleted at the end); commands below run with"
say "--home \$DEMO/home and KEYWARD_SOCK=\$DEMO/agent.sock"

# ----------------------------------------------------------------------------------------------
section "Create a keyward home"
# ----------------------------------------------------------------------------------------------
(
    umask 077
    head -c 24 /dev/urandom | base64 >"$P"
)
chmod 600 "$P"
say "The identity passphrase comes from a prompt, env:NAME, file:PATH (mode 0600) or stdin,"
say "never from argv. Here: a random one in a file."
kw init --passphrase "file:$P" --kdf-work-factor 10 | indent
say "home $H:"
(cd "$H" && stat -c '%A  %n' -- *) | indent
[ "$(stat -c %a "$H")" = 700 ] || fail "home is not mode 0700"
grep -q '^age1' "$H/identity.pub" || fail "identity.pub does not hold an age recipient"
say "identity.age = X25519 age identity, encrypted with the passphrase (scrypt, work factor 2^10"
say "for the demo; the default is tuned to about a second). identity.pub = its public half."

# ----------------------------------------------------------------------------------------------
section "Generate and import keys (no agent and no passphrase needed: keys are encrypted to identity.pub)"
# ----------------------------------------------------------------------------------------------
kw key generate demo-ed25519 --type ed25519 | indent
kw key generate demo-hmac --type hmac-sha256 | indent

# Binance's published HMAC example (docs: "SIGNED endpoint examples"): a public test secret,
# never a real one, so the demo can show the exact signature the exchange documents.
EX_SECRET='NhqPtmdSJYdKjVHjA7PZj4Mge3R5YNiP1e3UZjInClVN65XAbvqqM6A7H5fATj0j'
EX_QUERY='symbol=LTCBTC&side=BUY&type=LIMIT&timeInForce=GTC&quantity=1&price=0.1&recvWindow=5000&timestamp=1499827319559'
EX_DOC_SIG='c8db56825ae71d6d79447849e617115f4a920fa2acdcab2b053c4b2838bd6b71'
SECRET_FILE="$WORK/exchange-secret.txt"
(
    umask 077
    printf '%s\n' "$EX_SECRET" >"$SECRET_FILE"
)
say "An exchange issued an API secret; it sits in a file as downloaded ($SECRET_FILE)."
say "Import it from the file (never argv); --shred overwrites and deletes the file once the"
say "stored copy decrypts to the same bytes (that check needs the passphrase):"
kw key import exchange-hmac --type hmac-sha256 --file "$SECRET_FILE" --shred \
    --passphrase "file:$P" --api-key demo-api-key-id | indent
[ ! -e "$SECRET_FILE" ] || fail "--shred left $SECRET_FILE behind"
say "the secret file is gone."
kw key list | indent
say "keys/ holds one metadata file and one age-encrypted file per key version:"
(cd "$H/keys" && printf '%s\n' *) | indent

# ----------------------------------------------------------------------------------------------
section "Start the agent"
# ----------------------------------------------------------------------------------------------
say "It decrypts the identity once, keeps keys only in locked, zeroized memory, and serves"
say "a Unix socket (\$KEYWARD_SOCK here; default \$XDG_RUNTIME_DIR/keyward/agent.sock)."
AGENT_STARTED=1
# Output goes to a file, not a pipe: the daemon must not be able to hold the demo's pipe open.
kw agent --passphrase "file:$P" >"$WORK/agent.out"
agent_out=$(cat "$WORK/agent.out")
printf '%s\n' "$agent_out" | indent
status_json=$(kwq --json status)
AGENT_PID=$(printf '%s' "$status_json" | json_field pid)
if [ -z "$AGENT_PID" ]; then
    AGENT_PID=$(printf '%s\n' "$agent_out" | grep -oiE 'pid[^0-9]*[0-9]+' | grep -oE '[0-9]+' | head -n 1 || true)
fi
agent_alive || fail "could not find the agent's pid"
[ -S "$KEYWARD_SOCK" ] || fail "no socket at $KEYWARD_SOCK"
say "agent pid $AGENT_PID; socket $KEYWARD_SOCK mode $(stat -c %a "$KEYWARD_SOCK"), directory mode $(stat -c %a "$(dirname "$KEYWARD_SOCK")")"
say "only this uid and root may connect (checked with SO_PEERCRED on every connection)."
kw status | indent

# ----------------------------------------------------------------------------------------------
section "Sign with Ed25519 through the agent, verify with openssl"
# ----------------------------------------------------------------------------------------------
MSG_FILE="$WORK/order.json"
printf '%s' '{"symbol":"BTC-USD","side":"buy","qty":"0.01","price":"64000","ts":1700000000000}' >"$MSG_FILE"
say "message: $(cat "$MSG_FILE")"
ED_SIG=$(kw sign --key demo-ed25519 --file - <"$MSG_FILE")
say "signature (base64): $ED_SIG"
printf '%s' "$ED_SIG" | base64 -d >"$WORK/order.sig"
[ "$(stat -c %s "$WORK/order.sig")" = 64 ] || fail "an Ed25519 signature has 64 bytes"
kw key export-public demo-ed25519 --format pem >"$WORK/demo-ed25519.pub.pem"
indent <"$WORK/demo-ed25519.pub.pem"
say "$ openssl pkeyutl -verify -pubin -inkey demo-ed25519.pub.pem -rawin -in order.json -sigfile order.sig"
if openssl pkeyutl -verify -pubin -inkey "$WORK/demo-ed25519.pub.pem" -rawin \
    -in "$MSG_FILE" -sigfile "$WORK/order.sig" | indent; then
    ok "openssl accepts the agent's Ed25519 signature"
else
    fail "openssl rejected the Ed25519 signature"
fi
printf 'tampered' >>"$MSG_FILE"
if openssl pkeyutl -verify -pubin -inkey "$WORK/demo-ed25519.pub.pem" -rawin \
    -in "$MSG_FILE" -sigfile "$WORK/order.sig" >/dev/null 2>&1; then
    fail "openssl accepted the signature for a modified message"
fi
say "and rejects it for a modified message, as it should."

# ----------------------------------------------------------------------------------------------
section "Sign an exchange request with the imported HMAC secret, recompute it with openssl"
# ----------------------------------------------------------------------------------------------
Q_FILE="$WORK/query.txt"
printf '%s' "$EX_QUERY" >"$Q_FILE"
say "query string: $EX_QUERY"
TAG=$(kw sign --key exchange-hmac --encoding hex --file "$Q_FILE")
say "HMAC-SHA256 tag from the agent: $TAG"
# The secret is Binance's public example, so passing it to openssl on argv is harmless here;
# never do that with a real secret (argv is visible to every local user).
OSSL_TAG=$(openssl dgst -sha256 -hmac "$EX_SECRET" -r "$Q_FILE" | cut -d' ' -f1)
say "$ openssl dgst -sha256 -hmac <secret> query.txt  ->  $OSSL_TAG"
[ "$TAG" = "$OSSL_TAG" ] || fail "agent tag $TAG differs from openssl's $OSSL_TAG"
ok "the agent's tag equals openssl's"
[ "$TAG" = "$EX_DOC_SIG" ] || fail "tag differs from the signature the exchange documents"
ok "and equals the signature the exchange's documentation publishes for this example"
say "the generated HMAC key signs too (same secret, either digest):"
kw sign --key demo-hmac --scheme hmac-sha512 --encoding hex --file "$Q_FILE" | indent

# ----------------------------------------------------------------------------------------------
section "Sign a Binance order with the binance profile, under a policy"
# ----------------------------------------------------------------------------------------------
say "Bind the same secret to the binance profile: the agent then builds the exact query Binance"
say "expects (its own clock sets the timestamp) and refuses anything the policy does not allow."
printf '%s' "$EX_SECRET" | kw key import binance-main --type hmac-sha256 --profile binance \
    --api-key demo-api-key-id | indent
cat >>"$H/keyward.toml" <<'TOML'

[keys.binance-main]
methods = ["GET", "POST", "DELETE"]
allow_paths = ["/api/v3/*"]
guards = { symbols = ["LTCBTC", "BTCUSDT"], max_quantity = "5" }
TOML
say "policy added to keyward.toml:"
sed -n '/^\[keys.binance-main\]/,$p' "$H/keyward.toml" | indent
kw policy check | indent
kw reload | indent
ORDER_Q='symbol=LTCBTC&side=BUY&type=LIMIT&timeInForce=GTC&quantity=1&price=0.1'
show_cmd sign --key binance-main --profile binance --method POST --path /api/v3/order --query "$ORDER_Q"
OUT=$(kwq --json sign --key binance-main --profile binance --method POST --path /api/v3/order --query "$ORDER_Q")
printf '%s\n' "$OUT" | indent
PAYLOAD=$(printf '%s' "$OUT" | json_field payload)
PSIG=$(printf '%s' "$OUT" | json_field signature)
case "$PAYLOAD" in
"$ORDER_Q&timestamp="*) ;;
*) fail "unexpected payload: $PAYLOAD" ;;
esac
OSSL_PSIG=$(printf '%s' "$PAYLOAD" | openssl dgst -sha256 -hmac "$EX_SECRET" -r | cut -d' ' -f1)
[ "$PSIG" = "$OSSL_PSIG" ] || fail "profile signature $PSIG differs from openssl's $OSSL_PSIG"
ok "the signature is HMAC-SHA256 of the exact query sent, as openssl computes it"
kw sign --key binance-main --profile binance --method POST --path /api/v3/order --query "$ORDER_Q" \
    --curl https://api.binance.com | indent
for denied in "--path /sapi/v1/capital/withdraw/apply --query coin=BTC&amount=1" \
    "--path /api/v3/order --query symbol=LTCBTC&side=BUY&quantity=50"; do
    # shellcheck disable=SC2086 # the two arguments are split on purpose
    show_cmd sign --key binance-main --profile binance --method POST $denied
    # shellcheck disable=SC2086
    if err=$(kwq sign --key binance-main --profile binance --method POST $denied 2>&1); then
        fail "the policy allowed: $denied"
    fi
    printf '%s\n' "$err" | indent
    printf '%s' "$err" | grep -q 'error\[policy_denied\]: rule' || fail "expected policy_denied, got: $err"
done
ok "a withdrawal and an order over the quantity guard are refused, each naming its rule"

# ----------------------------------------------------------------------------------------------
section "Emergency lock"
# ----------------------------------------------------------------------------------------------
kw lock --key demo-ed25519 --reason "demo: suspected leak" | indent
show_cmd sign --key demo-ed25519 --file "$Q_FILE"
if err=$(kwq sign --key demo-ed25519 --file "$Q_FILE" 2>&1); then
    fail "a locked key signed: $err"
fi
printf '%s\n' "$err" | indent
printf '%s' "$err" | grep -q 'error\[locked\]' || fail "expected error[locked], got: $err"
say "refused while locked (locks persist in state/ and survive agent restarts)."
kw unlock --key demo-ed25519 | indent
kw sign --key demo-ed25519 --file "$Q_FILE" >/dev/null
say "signs again after unlock."

# ----------------------------------------------------------------------------------------------
section "Disaster recovery with stock age (no keyward needed)"
# ----------------------------------------------------------------------------------------------
say "age -d identity.age (asks for the passphrase) yields the AGE-SECRET-KEY-1... line;"
say "age -d -i <that file> keys/NAME.1.age yields the key: PKCS#8 PEM, or the HMAC secret."
ID_TXT="$WORK/identity.txt"
first() { [ -e "$1" ] || fail "no key file matches $1"; printf '%s' "$1"; }
ED_FILE=$(first "$H"/keys/demo-ed25519.*.age)
HM_FILE=$(first "$H"/keys/demo-hmac.*.age)
EX_FILE=$(first "$H"/keys/exchange-hmac.*.age)
# age reads passphrases only from a terminal: `script` gives it a pseudo-terminal and types the
# passphrase file into it (echo off). A person would just run `age -d -o identity.txt identity.age`.
age_cmd="age -d -o $(printf '%q' "$ID_TXT") $(printf '%q' "$H/identity.age")"
say "$ age -d -o identity.txt identity.age        (passphrase typed at the prompt)"
if command -v age >/dev/null 2>&1 && command -v script >/dev/null 2>&1 &&
    timeout 30 script -q -e -E never -c "$age_cmd" /dev/null <"$P" >/dev/null 2>&1 &&
    [ -s "$ID_TXT" ]; then
    grep -q '^AGE-SECRET-KEY-1' "$ID_TXT" || fail "identity.age did not decrypt to an age identity"
    say "identity.txt: AGE-SECRET-KEY-1... (not shown)"
    say "$ age -d -i identity.txt keys/$(basename "$ED_FILE") > recovered.pem"
    age -d -i "$ID_TXT" "$ED_FILE" >"$WORK/recovered.pem"
    say "recovered.pem starts with: $(head -n 1 "$WORK/recovered.pem")"
    openssl pkey -in "$WORK/recovered.pem" -pubout -out "$WORK/recovered.pub.pem"
    cmp -s "$WORK/recovered.pub.pem" "$WORK/demo-ed25519.pub.pem" ||
        fail "the recovered key's public half differs from export-public"
    ok "its public key equals \`keyward key export-public\`"
    printf '%s' '{"symbol":"BTC-USD","side":"buy","qty":"0.01","price":"64000","ts":1700000000000}' >"$MSG_FILE"
    openssl pkeyutl -sign -rawin -inkey "$WORK/recovered.pem" -in "$MSG_FILE" -out "$WORK/order.sig2"
    cmp -s "$WORK/order.sig" "$WORK/order.sig2" || fail "openssl's signature with the recovered key differs"
    ok "openssl signing with the recovered key gives the agent's exact signature (Ed25519 is deterministic)"
    age -d -i "$ID_TXT" "$EX_FILE" >"$WORK/recovered-secret.txt"
    [ "$(cat "$WORK/recovered-secret.txt")" = "$EX_SECRET" ] ||
        fail "the recovered exchange secret differs from the imported one"
    ok "the imported exchange secret decrypts to exactly what the exchange issued"
    hexkey=$(age -d -i "$ID_TXT" "$HM_FILE" | od -An -v -tx1 | tr -d ' \n')
    REC_TAG=$(openssl dgst -sha512 -mac HMAC -macopt "hexkey:$hexkey" -r "$Q_FILE" | cut -d' ' -f1)
    AG_TAG=$(kwq sign --key demo-hmac --scheme hmac-sha512 --encoding hex --file "$Q_FILE")
    [ "$REC_TAG" = "$AG_TAG" ] || fail "HMAC with the recovered generated secret differs"
    ok "the generated HMAC secret, recovered, reproduces the agent's HMAC-SHA512 tag"
else
    say "skipped: no pseudo-terminal for age's passphrase prompt here (see docs/quickstart.md)"
fi

# ----------------------------------------------------------------------------------------------
section "Stop the agent"
# ----------------------------------------------------------------------------------------------
say "$ kill -TERM $AGENT_PID      (SIGTERM: finish in-flight requests, remove the socket, exit)"
stop_agent || fail "the agent did not stop on SIGTERM"
say "agent stopped."
if kwq status >/dev/null 2>&1; then
    fail "the agent still answers after SIGTERM"
fi

# ----------------------------------------------------------------------------------------------
section "A key on a PKCS#11 token (SoftHSM): keyward testenv"
# ----------------------------------------------------------------------------------------------
SOFTHSM_MODULE=/usr/lib/softhsm/libsofthsm2.so
if [ "${KEYWARD_DEMO_SKIP_SOFTHSM:-0}" = 1 ] || [ ! -e "$SOFTHSM_MODULE" ]; then
    say "skipped: no SoftHSM module at $SOFTHSM_MODULE (scripts/setup.sh installs softhsm2)"
else
    say "testenv makes a private SoftHSM token, a home and an agent in one directory; here it"
    say "generates an Ed25519 key ON the token (non-extractable) from a small SPEC file."
    TE_DIR="$WORK/te"
    printf '[[keys]]\nname = "token-ed25519"\ntype = "ed25519"\n' >"$WORK/spec.toml"
    indent <"$WORK/spec.toml"
    say "$ eval \"\$(keyward testenv up --dir \$DEMO/te --keys spec.toml)\""
    te_env=$(env -u KEYWARD_SOCK "$KW" testenv up --dir "$TE_DIR" --keys "$WORK/spec.toml") ||
        fail "keyward testenv up failed"
    printf '%s\n' "$te_env" | sed "s|$WORK|\$DEMO|g" | indent
    # In a subshell: the testenv's variables must not leak into the soft demo's cleanup.
    (
        eval "$te_env"
        te() {
            show_cmd "$@"
            "$KW" "$@"
        }
        te token list | indent
        te key list | indent
        MSG2="$WORK/order2.json"
        printf '%s' '{"symbol":"ETH-USD","side":"sell","qty":"2","ts":1700000000001}' >"$MSG2"
        TSIG=$(te sign --key token-ed25519 --file "$MSG2") || fail "signing on the token failed"
        say "signature from the token (base64): $TSIG"
        printf '%s' "$TSIG" | base64 -d >"$WORK/order2.sig"
        "$KW" key export-public token-ed25519 --format pem >"$WORK/token.pub.pem"
        say "$ openssl pkeyutl -verify -pubin -inkey token.pub.pem -rawin -in order2.json -sigfile order2.sig"
        openssl pkeyutl -verify -pubin -inkey "$WORK/token.pub.pem" -rawin \
            -in "$MSG2" -sigfile "$WORK/order2.sig" | indent ||
            fail "openssl rejected the token's Ed25519 signature"
        ok "openssl accepts the Ed25519 signature made on the SoftHSM token through the agent"
        if command -v pkcs11-tool >/dev/null 2>&1; then
            say "$ pkcs11-tool --module $SOFTHSM_MODULE --list-objects --type privkey  (the key is on the token)"
            # The PIN of this throw-away token on argv is harmless; never do that with a real one.
            pkcs11-tool --module "$SOFTHSM_MODULE" --token-label keyward-testenv --login \
                --pin "$(cat "$TE_DIR/user-pin")" --list-objects --type privkey 2>/dev/null |
                grep -E 'Private Key|label|Access' | indent || true
        fi
    ) || exit 1
    say "$ keyward testenv down --dir \$DEMO/te"
    "$KW" testenv down --dir "$TE_DIR" | sed "s|$WORK|\$DEMO|g" | indent
    [ ! -e "$TE_DIR" ] || fail "testenv down left $TE_DIR behind"
    ok "testenv down stopped its agent and removed the token, home and socket"
fi

printf '\n%sdemo complete: every signature verified: OK%s\n' "$G$B" "$N"
say "next: README.md (using it for real) and docs/quickstart.md"
