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
# check_profile NAME TOL OUTPUT PART...: the -pt 1 table in a trainer's OUTPUT counts the model's
# FLOPs exactly once (100.0%), its parts add up to the measured step time within TOL percent and
# their shares to 100%, and each PART begins one of its lines
check_profile() {
    local name=$1 tol=$2 out=$3 why="" p; shift 3
    echo "$out" | grep -q "FLOPs in the parts 100.0% of the model's" || why="the parts' FLOPs are not the model's;"
    echo "$out" | awk -v tol="$tol" '/^profiled step time/ { p = $4; m = $7; seen = 1 }
        END { exit !(seen && m > 0 && p - m <= m * tol / 100 && m - p <= m * tol / 100) }' || why="$why parts vs measured step time;"
    echo "$out" | awk '/^part  / { on = 1; next } /^all parts/ { on = 0 } on && match($0, / [0-9]+\.[0-9]%/) { s += substr($0, RSTART + 1, RLENGTH - 2) }
        END { exit !(s > 99.4 && s < 100.6) }' || why="$why shares do not add up to 100%;"
    for p in "$@"; do
        echo "$out" | awk -v p="$p" 'index($0, p) == 1 { f = 1 } END { exit !f }' || why="$why no part '$p';"
    done
    if [ -z "$why" ]; then ok "$name"; else bad "$name" "$why $(echo "$out" | grep -A3 '^profiled\|^step profile' | head -5)"; fi
}
# profile_block OUTPUT LAYER: in -pt 2's second table, the block of the layer part LAYER (a prefix
# of its name): its line, then its steps' lines
profile_block() {
    echo "$1" | sed -n '/^steps inside the layers (-pt 2)/,$p' | awk -v p="$2" 'index($0, p) == 1 { on = 1; print; next } /^[^ ]/ { on = 0 } on'
}
# check_steps NAME OUTPUT LAYER STEP...: LAYER's -pt 2 block has each STEP (a prefix of a step's
# name), and its steps' shares of the layer's time with its rest add up to 100%, the rest not
# below -0.5% (the steps lie inside the layer's time)
check_steps() {
    local name=$1 out=$2 layer=$3 b why="" p; shift 3
    b=$(profile_block "$out" "$layer")
    [ -n "$b" ] || { bad "$name" "no -pt 2 block for '$layer': $(echo "$out" | sed -n '/^steps inside/,$p' | head -8)"; return; }
    echo "$b" | awk 'NR > 1 && match($0, / -?[0-9]+\.[0-9]%/) { v = substr($0, RSTART + 1, RLENGTH - 2) + 0; s += v; if ($0 ~ /\(rest\)/ && v < -0.5) neg = 1 }
        END { exit !(s > 99.4 && s < 100.6 && !neg) }' || why="shares do not add up to 100% or the rest is negative;"
    for p in "$@"; do
        echo "$b" | awk -v p="  $p" 'index($0, p) == 1 { f = 1 } END { exit !f }' || why="$why no step '$p';"
    done
    if [ -z "$why" ]; then ok "$name"; else bad "$name" "$why $(echo "$b" | head -20)"; fi
}
