# shellcheck shell=bash
# Sourced by tests/deploy/check and tests/container/check: one line per check ("PASS ...",
# "FAIL ...", "SKIP ..."), then "N passed, N failed" (the line scripts/test counts), and the
# installation of missing Debian packages.

passed=0
failed=0
pass() { echo "PASS $*"; passed=$((passed + 1)); }
fail() { echo "FAIL $*"; failed=$((failed + 1)); }
skip() { echo "SKIP $*"; }
indent() { sed 's/^/    /' | tail -n "${1:-25}"; }
finish() {
    echo "$passed passed, $failed failed"
    if [ "$failed" -eq 0 ]; then exit 0; fi
    exit 1
}

# Runs a checker that prints PASS/FAIL/SKIP lines; counts them. A checker that fails without
# saying which check failed counts as one failure.
run_checker() {  # name command...
    local name=$1 out rc=0 f0=$failed
    shift
    out=$("$@" 2>&1) || rc=$?
    while IFS= read -r line; do
        case "$line" in
            PASS\ *) pass "${line#PASS }" ;;
            FAIL\ *) fail "${line#FAIL }" ;;
            SKIP\ *) skip "${line#SKIP }" ;;
        esac
    done <<<"$out"
    if [ "$rc" -ne 0 ] && [ "$failed" -eq "$f0" ]; then
        fail "$name (exit $rc)"
        indent 25 <<<"$out"
    fi
}

installed() { [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" = "install ok installed" ]; }
if [ "$(id -u)" -eq 0 ]; then SUDO=(); else SUDO=(sudo -n); fi
# shellcheck disable=SC2034  # read by tests/deploy/check
apt_updated=0

# Installs the packages not installed yet (apt-get, as root or through sudo -n); on failure
# counts one failure, shows apt's output and finishes.
install_missing() {  # logfile package...
    local log=$1 p missing=()
    shift
    for p in "$@"; do installed "$p" || missing+=("$p"); done
    [ ${#missing[@]} -eq 0 ] && return 0
    echo "installing ${missing[*]}" >&2
    if ! { "${SUDO[@]}" apt-get update -q >/dev/null &&
           DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y -q --no-install-recommends \
               "${missing[@]}" >"$log" 2>&1; }; then
        fail "install ${missing[*]}"
        indent 25 <"$log"
        finish
    fi
    apt_updated=1
}
