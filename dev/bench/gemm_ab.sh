#!/usr/bin/env bash
# dev/bench/gemm_ab.sh: up to four versions of common/gemm.h timed alternately in one process
# (dev/bench/gemm_ab.c): the way to tell a kernel change of a few per cent on a shared machine,
# where separate runs of the same binary differ by 25% or more.
#   bash dev/bench/gemm_ab.sh                      HEAD's common/gemm.h against the working tree's
#   bash dev/bench/gemm_ab.sh b11e3f3 HEAD /tmp/my_gemm.h
# Each VERSION is a file (a copy of gemm.h) or a git revision (its common/gemm.h); version 0 is
# the baseline. SHAPES (d_in x d_out, default "768x3072 3072x768 768x768 1024x1024") and ROUNDS
# (default 6) in the environment.
set -euo pipefail
cd "$(dirname "$0")/../.."
SHAPES=${SHAPES:-768x3072 3072x768 768x768 1024x1024}
ROUNDS=${ROUNDS:-6}
CC=${CC:-gcc}
CFLAGS=${CFLAGS:--O3 -march=native -ffast-math -fno-finite-math-only}

[ $# -eq 0 ] && set -- HEAD common/gemm.h
[ $# -gt 4 ] && { echo "gemm_ab.sh: at most 4 versions (got $#)" >&2; exit 1; }
[[ $ROUNDS =~ ^[1-9][0-9]*$ ]] || { echo "gemm_ab.sh: ROUNDS=$ROUNDS: expected a positive integer" >&2; exit 1; }
for s in $SHAPES; do
    [[ $s =~ ^[1-9][0-9]*[02468]x[1-9][0-9]*[02468]$ ]] || { echo "gemm_ab.sh: SHAPES: $s: expected d_inxd_out, both even, e.g. 768x3072" >&2; exit 1; }
done

DIR=$(mktemp -d)
trap 'rm -rf "$DIR"' EXIT
i=0
for v in "$@"; do
    mkdir -p "$DIR/v$i/common"
    if [ -f "$v" ]; then
        cp "$v" "$DIR/v$i/common/gemm.h"
    elif ! git show "$v:common/gemm.h" > "$DIR/v$i/common/gemm.h" 2>/dev/null; then
        echo "gemm_ab.sh: $v is neither a file nor a git revision with common/gemm.h" >&2
        exit 1
    fi
    echo "version $i: $v"
    i=$((i + 1))
done
objs=()
for j in 0 1 2 3; do  # the driver names four versions; unused slots get version 0's code
    src=$j; [ $j -ge $# ] && src=0
    $CC $CFLAGS -DGEMM_AB_TU -DNAME=ab_gemm_$j -I"$DIR/v$src" -c dev/bench/gemm_ab.c -o "$DIR/tu$j.o"
    objs+=("$DIR/tu$j.o")
done
$CC $CFLAGS -fopenmp -DGEMM_AB_VARIANTS=$# dev/bench/gemm_ab.c "${objs[@]}" -o "$DIR/gemm_ab"
echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'), $(nproc) cpus; $CC $CFLAGS; best of $ROUNDS rounds"
for s in $SHAPES; do
    "$DIR/gemm_ab" "${s%x*}" "${s#*x}" "$ROUNDS"
done
