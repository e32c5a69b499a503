#!/usr/bin/env bash
# Prepare a Debian 12 machine for keyward and build the release binaries.
#
#   scripts/setup.sh
#
# Idempotent: it only installs what is missing (apt-get update runs only then), only adds
# rustup components that are missing, and `cargo build` is a no-op when nothing changed, so a
# second run takes seconds. Works as root (CI) or as a user with sudo.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '[setup] %s\n' "$*"; }
die() {
    printf '[setup] error: %s\n' "$*" >&2
    exit 1
}

# Every system package the project uses, now or in the next issues:
#   age                     stock age, for disaster recovery of software keys (and the demo)
#   openssl                 independent signature checks in the demo and tests
#   openssh-client/-server  ssh-agent / ssh-keygen (benchmark baseline, OpenSSH key import tests)
#   pkg-config libclang-dev bindgen-based -sys crates (PKCS#11, TPM, PC/SC backends)
#   gcc libc6-dev           C parts of aws-lc-rs
#   softhsm2 opensc         PKCS#11 token for tests (softhsm2-util, pkcs11-tool)
#   swtpm swtpm-tools       software TPM 2.0 for tests (scripts/swtpm.sh)
#   tpm2-tools              tpm2_* commands (adopting persistent keys, lockout recovery)
#   libtss2-dev             tpm2-tss libraries and headers for tss-esapi (the TPM backend)
#   python3                 the stdlib Python client and its examples
#   procps util-linux       ps/pgrep; setpriv, runuser, script (multi-user tests, demo)
#   passwd                  useradd (a second uid for the multi-user tests)
#   git                     build metadata, CI
#   (shellcheck)            lint for the scripts in scripts/ (run by scripts/test.sh)
PACKAGES=(
    age
    openssl
    openssh-client
    openssh-server
    pkg-config
    libclang-dev
    gcc
    libc6-dev
    softhsm2
    opensc
    swtpm
    swtpm-tools
    tpm2-tools
    libtss2-dev
    python3
    procps
    util-linux
    passwd
    git
    shellcheck
)

# --- system packages --------------------------------------------------------------------------
if ! command -v dpkg-query >/dev/null 2>&1; then
    die "this script targets Debian/Ubuntu (dpkg-query not found); install the equivalent of: ${PACKAGES[*]}"
fi

missing=()
for p in "${PACKAGES[@]}"; do
    if [ "$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null || true)" != "installed" ]; then
        missing+=("$p")
    fi
done

if [ "${#missing[@]}" -eq 0 ]; then
    say "system packages: all ${#PACKAGES[@]} present"
else
    if [ "$(id -u)" -eq 0 ]; then
        SUDO=()
    elif command -v sudo >/dev/null 2>&1; then
        SUDO=(sudo)
    else
        die "missing packages (${missing[*]}) and not root; run as root or install sudo"
    fi
    say "installing: ${missing[*]} (apt-get update + install; output in a log shown on failure)"
    apt_log=$(mktemp "${TMPDIR:-/tmp}/keyward-setup-apt.XXXXXX")
    if ! { "${SUDO[@]}" apt-get update -q &&
        "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive \
            apt-get install -y -q --no-install-recommends "${missing[@]}"; } >"$apt_log" 2>&1; then
        tail -n 40 "$apt_log" >&2
        rm -f "$apt_log"
        die "apt-get failed (see the output above)"
    fi
    rm -f "$apt_log"
    # openssh-server's postinst may start sshd on some images; keyward never needs it running.
    say "system packages installed"
fi

# --- Rust toolchain ---------------------------------------------------------------------------
if ! command -v cargo >/dev/null 2>&1 && [ -f "${HOME:-/root}/.cargo/env" ]; then
    # shellcheck disable=SC1091
    . "${HOME:-/root}/.cargo/env"
fi
command -v cargo >/dev/null 2>&1 || die "cargo not found; install the Rust toolchain with rustup"

for comp in rustfmt clippy; do
    sub=$comp
    [ "$comp" = rustfmt ] && sub=fmt
    if cargo "$sub" --version >/dev/null 2>&1; then
        continue
    fi
    command -v rustup >/dev/null 2>&1 || die "cargo $sub is missing and rustup is not installed"
    say "adding rustup component $comp"
    rustup component add "$comp"
done
say "toolchain: $(cargo --version), rustfmt and clippy present"

# --- build ------------------------------------------------------------------------------------
say "building release binaries (cargo build --release --workspace --locked)"
cargo build --release --workspace --locked
for b in keyward keyward-agent; do
    [ -x "target/release/$b" ] || die "target/release/$b was not built"
done
say "ready: target/release/keyward, target/release/keyward-agent"
