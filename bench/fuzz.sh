#!/usr/bin/env bash
# The property-based tests in a loop, with many cases per run, for a while (default 60
# minutes); each run draws new random cases. Stops by itself at the deadline, or at the
# first failure (exit 1, with the failing input shrunk by proptest in the output).
#
#   bench/fuzz.sh [--minutes N]
#
# Suites (cases per run):
#   HTTP/1 requests through a real proxy and backend   proxy/cli/tests/proxy/fuzz.rs     2,000
#   AdmissionReviews, install files and --set           tests/fuzz_inputs.rs          5,000 each
#   resource YAML (load and translate)                  translate/tests/fuzz.rs       2,000
# Debug builds on purpose: overflow checks and debug assertions find more.
set -euo pipefail
cd "$(dirname "$0")/.."

usage() { sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; }
minutes=60
while [ $# -gt 0 ]; do
    case "$1" in
        --minutes) minutes="${2:-}"; shift 2 || { echo "--minutes needs a value" >&2; exit 2; } ;;
        --minutes=*) minutes="${1#*=}"; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
done
if ! [[ "$minutes" =~ ^[0-9]+$ ]] || [ "$minutes" -lt 1 ]; then
    echo "--minutes takes a whole number of minutes, at least 1 (got \"$minutes\")" >&2
    exit 2
fi
deadline=$(( $(date +%s) + minutes * 60 ))

# name | cargo package | test target | test filter | cases per run
suites=(
    "http|mesh-proxy-cli|proxy|fuzz::|2000"
    "webhook+install|meshctl|fuzz_inputs||5000"
    "resources|mesh-translate|fuzz||2000"
)

declare -A bin cases_done runs
for s in "${suites[@]}"; do
    IFS='|' read -r name pkg target _ _ <<<"$s"
    echo "building $pkg --test $target" >&2
    exe=$(cargo test --no-run -p "$pkg" --test "$target" 2>&1 |
        sed -n 's/.*Executable .*(\(.*\))$/\1/p' | tail -n 1)
    [ -x "$exe" ] || { echo "no test binary for $pkg --test $target" >&2; exit 1; }
    bin[$name]=$exe
    cases_done[$name]=0
    runs[$name]=0
done

log=$(mktemp -t mesh-fuzz.XXXXXX)
trap 'rm -f "$log"' EXIT
summary() {
    echo "fuzz: $1 after $(( ($(date +%s) - deadline + minutes * 60) / 60 )) min"
    for s in "${suites[@]}"; do
        IFS='|' read -r name _ _ _ _ <<<"$s"
        echo "  $name: ${runs[$name]} runs, ${cases_done[$name]} cases"
    done
}

while :; do
    for s in "${suites[@]}"; do
        IFS='|' read -r name _ _ filter n <<<"$s"
        left=$(( deadline - $(date +%s) ))
        if [ "$left" -le 0 ]; then summary "time is up"; exit 0; fi
        set +e
        PROPTEST_CASES=$n timeout "$left" "${bin[$name]}" $filter --nocapture --test-threads 2 \
            >"$log" 2>&1
        status=$?
        set -e
        if [ "$status" -eq 124 ]; then summary "time is up"; exit 0; fi
        if [ "$status" -ne 0 ]; then
            grep -v '^\s*[0-9]*: \|^\s*at ' "$log" | tail -n 60
            summary "FAILED in $name (output above)"
            exit 1
        fi
        passed=$(sed -n 's/.*: \([0-9]*\) cases passed.*/\1/p' "$log" | awk '{s += $1} END {print s + 0}')
        cases_done[$name]=$(( ${cases_done[$name]} + ${passed:-0} ))
        runs[$name]=$(( ${runs[$name]} + 1 ))
        echo "$(date +%H:%M:%S) $name: run ${runs[$name]} passed (${passed:-0} cases)"
    done
done
