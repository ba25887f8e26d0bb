# lib.sh: shared by the shell tests: pass/fail counting in the "ok NAME" / "FAIL NAME: why" form
# that tests/run_all.sh adds up, and a scratch directory removed on exit (kept with KEEP=1).
pass=0; fail=0
ok() { pass=$((pass + 1)); echo "ok $1"; }
bad() { fail=$((fail + 1)); echo "FAIL $1: $2"; }
W=$(mktemp -d "/tmp/structgpt_$(basename "$0" .sh).XXXXXX")
[ -n "${KEEP:-}" ] || trap 'rm -rf "$W"' EXIT
summary() { echo "$pass passed, $fail failed"; [ "$fail" -eq 0 ]; }
# NVCC: the CUDA compiler; without one, the test says what it skips and ends with its summary
need_nvcc() {
    NVCC=$(command -v nvcc 2>/dev/null || ls /usr/local/cuda/bin/nvcc 2>/dev/null)
    [ -n "$NVCC" ] && return 0
    echo "# nvcc not found: $1"
    summary; exit
}
