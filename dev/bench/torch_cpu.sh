#!/usr/bin/env bash
# dev/bench/torch_cpu.sh: the CPU trainer's linear layers against the same layers computed the way
# the papers' public PyTorch code computes them (dev/bench/structured_torch.py --device cpu: bmm,
# transpose, contiguous, bmm; BTT-MoE computes all 8 experts and masks), on the same CPU with the
# same thread count, fp32: one layer d -> d, forward + backward over N tokens, at d = 768, 1024 and
# 2048 (or DIMS). The two programs run alternately ROUNDS times (this kind of machine is shared, and its speed
# drifts); each figure is the best of all its runs. PyTorch is not a requirement of the repository:
# pip install torch first.
#   bash dev/bench/torch_cpu.sh                 (N=4096 REPS=3 ROUNDS=3 DIMS=768,1024,2048)
set -euo pipefail
cd "$(dirname "$0")/../.."

N=${N:-4096}
REPS=${REPS:-3}
ROUNDS=${ROUNDS:-3}
DIMS=${DIMS:-768,1024,2048}
for v in N REPS ROUNDS; do
    [[ ${!v} =~ ^[1-9][0-9]*$ ]] || { echo "torch_cpu.sh: $v=${!v}: expected a positive integer" >&2; exit 1; }
done
[[ $DIMS =~ ^[0-9]+(,[0-9]+)*$ ]] || { echo "torch_cpu.sh: DIMS=$DIMS: expected widths separated by commas, e.g. 256,768" >&2; exit 1; }
for d in ${DIMS//,/ }; do
    [ "$d" -ge 8 ] && [ $((d % 4)) -eq 0 ] || { echo "torch_cpu.sh: DIMS=$DIMS: each width a multiple of 4 and at least 8 (Monarch's 4 blocks)" >&2; exit 1; }
done

torch_version=$(python3 -c 'import torch; print(torch.__version__, torch.get_num_threads())' 2>/dev/null) || {
    echo "torch_cpu.sh: PyTorch is not installed (python3 -c 'import torch' failed); pip install torch" >&2
    exit 2
}
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
make -s build/bench_layers_cpu > "$OUT/make.log" 2>&1 || { cat "$OUT/make.log"; exit 1; }
cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')
echo "machine: ${cpu:-unknown CPU}, $(nproc) cpus; commit $(git rev-parse --short HEAD 2>/dev/null || echo '?'); $(date -u +%Y-%m-%d)"
echo "ours:    build/bench_layers_cpu $N $REPS --results --dims $DIMS ($(build/bench_layers_cpu 1 1 | head -1 | sed 's/.*(fp32, //; s/)$//'))"
echo "torch:   PyTorch ${torch_version% *}, ${torch_version#* } threads: structured_torch.py --device cpu --shapes sq -n $N --reps $REPS"
echo "rounds:  $ROUNDS, alternating; best of all runs"
echo

for r in $(seq "$ROUNDS"); do
    build/bench_layers_cpu "$N" "$REPS" --results --dims "$DIMS" | grep '^RESULT' >> "$OUT/ours.log"
    python3 dev/bench/structured_torch.py --device cpu --dims "$DIMS" --shapes sq -n "$N" --warmup 1 --reps "$REPS" |
        grep '^RESULT' >> "$OUT/torch.log"
done

awk -v dims="$DIMS" '
    function field(line, key,   m) { if (match(line, " " key "=[^ ]*")) return substr(line, RSTART + length(key) + 2, RLENGTH - length(key) - 2); return "" }
    FNR == 1 { src++ }
    /^RESULT/ {
        k = field($0, "d") SUBSEP field($0, "struct"); ms = field($0, "ms") + 0
        if (ms <= 0 || ms != ms) next
        if (src == 1) { if (!(k in ours) || ms < ours[k]) ours[k] = ms }
        else { if (!(k in torch) || ms < torch[k]) torch[k] = ms }
    }
    END {
        split("dense btt_r1 btt_r2 btt_r4 monarch_4 monarch_sqrt btt_moe_8x2", names, " ")
        n = split(dims, ds, ",")
        printf "%-6s %-13s %10s %10s %12s %13s %13s\n", "d", "structure", "ours ms", "torch ms", "torch/ours", "ours vs dense", "torch vs dense"
        total = slower = 0
        for (i = 1; i <= n; i++) for (j = 1; j <= 7; j++) {
            k = ds[i] SUBSEP names[j]; kd = ds[i] SUBSEP "dense"
            if (!(k in ours) || !(k in torch)) { printf "%-6s %-13s %10s\n", ds[i], names[j], "missing"; continue }
            printf "%-6s %-13s %10.2f %10.2f %11.2fx %12.2fx %12.2fx\n", ds[i], names[j], ours[k], torch[k], torch[k] / ours[k],
                   ours[kd] / ours[k], torch[kd] / torch[k]
            if (j > 1) { total++; if (torch[k] < 2 * ours[k]) slower++ }
        }
        printf "\nstructured layers at least 2x faster than the PyTorch version: %d of %d\n", total - slower, total
    }' "$OUT/ours.log" "$OUT/torch.log"
