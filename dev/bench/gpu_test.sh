#!/usr/bin/env bash
# dev/bench/gpu_test.sh: test_gpt2cu's units to the end, past a unit that ends its process. A CUDA
# error is sticky: the process that meets one (say a kernel never run on this GPU before) can run
# nothing more, and test_gpt2cu would stop there with every later check unrun. So where a run ends
# without its "N passed, N failed" line, the units after the one it died in (its last "# unit"
# line) run in a new process, and so on. The last line adds up every process's checks, with one
# failure for each unit that died:
#   bash dev/bench/gpu_test.sh ./test_gpt2cu [fixtures directory] [--units A,B,...]
# (dev/bench/device_run.sh's test stage; tests/test_bench_rerun.sh checks it on the simulator.)
set -uo pipefail
[ $# -ge 1 ] && [ -x "$1" ] || { echo "usage: gpu_test.sh ./test_gpt2cu [fixtures directory] [--units A,B,...]"; exit 2; }
bin=$1; shift
# shellcheck source=dev/bench/common.sh disable=SC1091
source "$(dirname "$0")/common.sh"  # list_after
args=() units=""
while [ $# -gt 0 ]; do
    if [ "$1" = --units ]; then units=${2:-}; shift 2; else args+=("$1"); shift; fi
done
all=$("$bin" --list-units) || { echo "gpu_test.sh: $bin --list-units failed"; exit 2; }
[ -n "$units" ] || units=$all
log=$(mktemp "${TMPDIR:-/tmp}/gpu_test.XXXXXX")
trap 'rm -f "$log"' EXIT
pass=0 fail=0 died=() rc=0
while [ -n "$units" ]; do
    "$bin" ${args[@]+"${args[@]}"} --units "$units" 2>&1 | tee "$log"
    rc=${PIPESTATUS[0]}
    sum=$(grep -E '^[0-9]+ passed, [0-9]+ failed$' "$log" | tail -1)
    if [ -n "$sum" ]; then
        pass=$((pass + $(cut -d' ' -f1 <<< "$sum"))); fail=$((fail + $(cut -d' ' -f3 <<< "$sum")))
        break
    fi
    # it died: count what it reported, then the units after the last one it began
    pass=$((pass + $(grep -c '^ok ' "$log"))); fail=$((fail + $(grep -c '^FAIL ' "$log") + 1))
    last=$(grep '^# unit ' "$log" | tail -1 | sed -E 's/^# unit ([^:]+):.*/\1/')
    why=$(grep . "$log" | tail -1)
    if [ -z "$last" ]; then
        echo "FAIL test_gpt2cu ended (rc $rc) before its first unit: ${why:0:300}"
        break
    fi
    died+=("$last")
    echo "FAIL test_gpt2cu ended (rc $rc) in unit $last; its later checks are unrun: ${why:0:300}"
    units=$(list_after "$units" "$last")
    [ -n "$units" ] && echo "# gpu_test.sh: the units after $last in a new process: $units"
done
[ ${#died[@]} -gt 0 ] && echo "# gpu_test.sh: units that ended their process: ${died[*]}"
echo "$pass passed, $fail failed"
[ "$fail" -eq 0 ]
