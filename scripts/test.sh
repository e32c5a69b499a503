#!/usr/bin/env bash
# Run every check CI runs: setup, shell syntax, formatting, clippy, and the whole test suite.
#
#   scripts/test.sh
#
# Exits non-zero on the first failing step (the test step still prints its summary first).
# KEYWARD_TEST_TIMEOUT (seconds, default 1500) bounds `cargo test` so a hung test cannot eat
# the CI budget.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }
die() {
    printf 'test.sh: FAILED: %s\n' "$*" >&2
    exit 1
}

started=$SECONDS

step "setup (scripts/setup.sh)"
bash scripts/setup.sh

step "shell scripts: bash -n"
shopt -s nullglob
shell_scripts=(scripts/*.sh .ci/run)
shopt -u nullglob
for f in "${shell_scripts[@]}"; do
    bash -n "$f" || die "bash -n $f"
done
echo "syntax OK: ${shell_scripts[*]}"
if command -v shellcheck >/dev/null 2>&1; then
    # Errors fail the run; warnings are shown as advice so style never blocks CI.
    shellcheck -S error "${shell_scripts[@]}" || die "shellcheck found errors"
    if shellcheck -S warning "${shell_scripts[@]}"; then
        echo "shellcheck OK"
    else
        echo "shellcheck: no errors; the warnings above are advisory"
    fi
else
    echo "shellcheck not installed; skipped"
fi

step "cargo fmt --all -- --check"
cargo fmt --all -- --check || die "formatting differs; run: cargo fmt --all"

step "cargo clippy --workspace --all-targets --locked -- -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings || die "clippy"

step "cargo test --workspace --locked"
log=$(mktemp "${TMPDIR:-/tmp}/keyward-test.XXXXXX")
trap 'rm -f "$log"' EXIT
set +e
timeout --kill-after=30 "${KEYWARD_TEST_TIMEOUT:-1500}" \
    cargo test --workspace --locked --no-fail-fast 2>&1 | tee "$log"
test_rc=${PIPESTATUS[0]}
set -e
if [ "$test_rc" -eq 124 ] || [ "$test_rc" -eq 137 ]; then
    echo "cargo test exceeded ${KEYWARD_TEST_TIMEOUT:-1500} s and was stopped" >&2
fi

# ==> BENCH STEP (owned by the benchmark helper): a quick `scripts/bench.sh --quick` run goes
# here. Keep it before the summary below, so the summary stays the last lines printed.

step "summary"
# One line per test binary: which binary ran, then its `test result:` line.
awk '
    /^[[:space:]]*Doc-tests/ { bin = $0; sub(/^[[:space:]]+/, "", bin) }
    /^[[:space:]]*Running/ {
        bin = $0
        sub(/^[[:space:]]+Running /, "", bin)
        sub(/ \(target\/.*$/, "", bin)
        if (bin ~ /^unittests / && match($0, /deps\/[A-Za-z0-9_]+-/)) {
            bin = substr($0, RSTART + 5, RLENGTH - 6) " " substr(bin, 11)
        }
    }
    /^test result:/ { printf "  %-28s %s\n", bin, $0 }
' "$log"
passed=0 failed=0 ignored=0
while read -r p f i; do
    passed=$((passed + p)) failed=$((failed + f)) ignored=$((ignored + i))
done < <(sed -nE 's/^test result: [A-Za-z]+\. ([0-9]+) passed; ([0-9]+) failed; ([0-9]+) ignored.*/\1 \2 \3/p' "$log")
if grep -qE '^test .+ \.\.\. FAILED$' "$log"; then
    echo "failed tests:"
    sed -nE 's/^test (.+) \.\.\. FAILED$/  \1/p' "$log"
fi
if [ "$test_rc" -ne 0 ] && [ "$failed" -eq 0 ]; then
    echo "cargo test failed without a failing test (build error or timeout; see above)"
fi
elapsed=$((SECONDS - started))
printf 'scripts/test.sh finished in %dm%02ds (cargo test exit status %d)\n' \
    $((elapsed / 60)) $((elapsed % 60)) "$test_rc"
printf 'total: %d passed, %d failed, %d skipped\n' "$passed" "$failed" "$ignored"
[ "$test_rc" -eq 0 ] || exit "$test_rc"
