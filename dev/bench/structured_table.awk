# dev/bench/structured_table.awk: structured.sh's table of the structured layers (dev/cuda/
# structured_layers' RESULT lines joined with structured_torch.py's of the same din/dout/struct),
# the issue's goals per row, then each layer's fastest path as -at 1 runs it: the least of its
# paths' forward + backward times, and for BTT and Monarch the fastest forward with the fastest
# backward of the paths that save z (the plans, -sk 1, 2, 3, 5: any backward follows any forward),
# for BTT-MoE likewise among its rows grouped by set (-mg 1 on the plans and the fused kernels),
# with the goals again on those. Runs on saved logs too:
#   awk -v torch_ran=0 -v moe_variant=mask_z -v tfile=layers_torch.log -f dev/bench/structured_table.awk \
#       layers_torch.log layers_cuda.log
# torch_ran: 0 when the PyTorch column was timed; tfile: the file whose RESULT lines are PyTorch's.
function kv(line, a,   n, i, f, p) {
    delete a
    n = split(line, f, " ")
    for (i = 2; i <= n; i++) { p = index(f[i], "="); if (p) a[substr(f[i], 1, p - 1)] = substr(f[i], p + 1) }
}
function isnum(v) { return v ~ /^[0-9.eE+-]+$/ && v + 0 > 0 }
FILENAME == tfile {
    if ($1 == "RESULT") { kv($0, r); k = r["din"] "/" r["dout"] "/" r["struct"]; tms[k] = ("note" in r) ? r["note"] : r["ms"] }
    next
}
$1 == "DEVICE" { kv($0, r); peak = r["peak_tflops"] + 0; next }
$1 != "RESULT" { next }
{
    kv($0, r)
    # structured.sh reruns what follows a case that ended its process, dense first again: the first row counts
    if ((r["d"] "/" r["din"] "/" r["dout"] "/" r["struct"]) in seen) next
    seen[r["d"] "/" r["din"] "/" r["dout"] "/" r["struct"]] = 1
    n++
    D[n] = r["d"] + 0; DIN[n] = r["din"] + 0; DOUT[n] = r["dout"] + 0; S[n] = r["struct"]; MS[n] = r["ms"] + 0
    FR[n] = r["flop_ratio"]; FL[n] = r["floor_ms"] + 0; PCT[n] = r["pct_floor"] + 0; VS[n] = r["vs_dense"] + 0; CHK[n] = r["check"]
    FW[n] = ("fwd_ms" in r) ? r["fwd_ms"] + 0 : -1
    base = S[n]; sub(/_(fused|ws|mma|split|zt|sm)$/, "", base); sub(/_sets$/, "", base)  # a fused (or -sm 1, -mg 1) row is the same layer as PyTorch computes it
    BASE[n] = base
    key = DIN[n] "/" DOUT[n] "/" base
    TM[n] = (key in tms) ? tms[key] : "-"
    shape = DIN[n] "/" DOUT[n]
    if (S[n] == "btt_r2") R2[shape] = MS[n]
    if (S[n] == "btt_r2_fused") R2F[shape] = MS[n]
    if (S[n] == "btt_r2_ws") R2W[shape] = MS[n]
    if (S[n] == "btt_r2_zt") R2Z[shape] = MS[n]
    if (S[n] == "btt_r2_mma") R2M[shape] = MS[n]
}
END {
    printf "== structured layers, forward + backward, N rows as above (PyTorch: %s; BTT-MoE there: %s)\n",
           ((torch_ran == 0) ? "same GPU, same script" : "skipped"), moe_variant
    printf "%5s %-11s %-17s %10s %8s %9s %8s %8s %11s %9s %5s\n", "d", "shape", "structure", "ms", "FLOP/d", "floor ms", "%floor",
           "vs dense", "PyTorch ms", "speedup", "check"
    for (i = 1; i <= n; i++) {
        sp = isnum(TM[i]) ? sprintf("%.2fx", TM[i] / MS[i]) : "-"
        tmv = isnum(TM[i]) ? sprintf("%.3f", TM[i]) : (TM[i] == "-" ? "-" : TM[i])
        printf "%5d %-11s %-17s %10.3f %8.3f %9.3f %7.1f%% %8.3f %11s %9s %5s\n", D[i], DIN[i] "->" DOUT[i], S[i], MS[i], FR[i], FL[i],
               PCT[i], VS[i], tmv, sp, CHK[i]
    }
    # the goals of issue 5
    g1 = g2 = g3 = g4 = ""; n1 = n2 = n3 = n4 = m1 = m2 = m3 = m4 = 0; no_torch = 0
    for (i = 1; i <= n; i++) {
        if (S[i] == "dense") continue
        tag = S[i] " d=" D[i] (DOUT[i] == DIN[i] ? " (sq)" : "")
        n1++; if (!(MS[i] <= 1.5 * FL[i])) { m1++; g1 = g1 sprintf("%s %s %.1fx", (g1 == "" ? "" : ","), tag, MS[i] / FL[i]) }
        if (isnum(TM[i])) { n2++; if (!(TM[i] / MS[i] >= 2.0)) { m2++; g2 = g2 sprintf("%s %s %.2fx", (g2 == "" ? "" : ","), tag, TM[i] / MS[i]) } }
        else no_torch++
        if (D[i] >= 1024 && S[i] ~ /^(btt_r[124]|monarch_)/) {
            n3++; if (!(VS[i] < 1.0)) { m3++; g3 = g3 sprintf("%s %s %.2fx", (g3 == "" ? "" : ","), tag, VS[i]) }
        }
        r2 = BASE[i] == "btt_moe_8x2" ? r2_same_path(S[i], DIN[i] "/" DOUT[i]) : 0
        if (r2 > 0) {
            q = MS[i] / r2
            n4++; if (!(q <= 1.5)) { m4++; g4 = g4 sprintf("%s %s %.2fx", (g4 == "" ? "" : ","), tag, q) }
        }
    }
    print ""
    print "goals (issue 5):"
    printf "  %-4s every structured layer within 1.5x of its roofline floor: %d of %d%s%s\n", ((n1 && !m1) ? "PASS" : "MISS"),
           n1 - m1, n1, (m1 ? "; misses (time/floor):" g1 : ""), ((peak > 0) ? "" : " [peak FLOP/s unknown for this GPU: floors from bytes only]")
    if (n2 == 0) printf "  %-4s >= 2x faster than the PyTorch version: no PyTorch timings\n", "n/a"
    else printf "  %-4s >= 2x faster than the PyTorch version: %d of %d%s%s\n", ((!m2 && !no_torch) ? "PASS" : "MISS"), n2 - m2, n2,
                (m2 ? "; misses (speedup):" g2 : ""), (no_torch ? sprintf(" (%d without a PyTorch time)", no_torch) : "")
    if (n3 == 0) printf "  %-4s at width >= 1024, BTT rank <= 4 and Monarch faster than dense: no such rows\n", "n/a"
    else printf "  %-4s at width >= 1024, BTT rank <= 4 and Monarch faster than dense: %d of %d%s\n", (m3 ? "MISS" : "PASS"), n3 - m3, n3,
                (m3 ? "; misses (time/dense):" g3 : "")
    if (n4 == 0) printf "  %-4s BTT-MoE 8/top-2 no more than 1.5x the time of BTT rank 2: no such rows\n", "n/a"
    else printf "  %-4s BTT-MoE 8/top-2 no more than 1.5x the time of BTT rank 2: %d of %d%s\n", (m4 ? "MISS" : "PASS"), n4 - m4, n4,
                (m4 ? "; misses (time/btt_r2):" g4 : "")
    fastest()
}

# The time of BTT rank 2 of shape sh on the kernels a BTT-MoE row s runs (a set path's forward
# fused as -sk 2 or 5: that kernel's row), or 0 when there is no such row.
function r2_same_path(s, sh) {
    if (s ~ /_(ws)$/) return (sh in R2W) ? R2W[sh] : 0
    if (s ~ /_(mma)$/) return (sh in R2M) ? R2M[sh] : 0
    if (s ~ /_fused$/) return (sh in R2F) ? R2F[sh] : 0
    if (s ~ /_zt$/) return (sh in R2Z) ? R2Z[sh] : 0
    return (sh in R2) ? R2[sh] : 0
}

# A path's name from its row's suffix: the trainer's flags that run it.
function path_name(s,   sets) {
    sets = s ~ /_sets(_[a-z]+)?$/ ? "-mg 1 " : ""
    if (sets != "" && s ~ /_sets$/) return "-mg 1"
    return sets (s ~ /_fused$/ ? "-sk 1" : s ~ /_ws$/ ? "-sk 2" : s ~ /_mma$/ ? "-sk 5" : s ~ /_split$/ ? "-sk 3" : s ~ /_zt$/ ? "-sk 4" : s ~ /_sm$/ ? "dense (-sm 1)" : "-sk 0")
}

# Each (d, shape, structure)'s fastest path, as -at 1 chooses it (without its 3% margin): the
# least total of its rows, or for BTT and Monarch the fastest forward of the rows that save z with
# the fastest backward of them (backward = ms - fwd_ms), for BTT-MoE of its rows grouped by set,
# when that is less. The goals on those.
function fastest(   i, k, j, nk, key, order, bi, fi, bw, pair, t, how, dn, fl, tm, sp, r2, tag, g1, g2, g3, g4, n1, n2, n3, n4, m1, m2, m3, m4) {
    nk = 0
    for (i = 1; i <= n; i++) {
        if (S[i] == "dense") { DENSE[D[i] "/" DIN[i] "/" DOUT[i]] = MS[i]; continue }
        key = D[i] "/" DIN[i] "/" DOUT[i] "/" BASE[i]
        if (!(key in BEST)) { order[++nk] = key; KD[key] = D[i]; KIN[key] = DIN[i]; KOUT[key] = DOUT[i]; KS[key] = BASE[i]; BEST[key] = i }
        if (MS[i] < MS[BEST[key]]) BEST[key] = i
        if (S[i] ~ /_(sm|zt)$/ || FW[i] < 0) continue  # dense and -sk 4 pair with nothing
        if (BASE[i] ~ /^btt_moe/ && S[i] !~ /_sets(_ws|_mma)?$/) continue  # BTT-MoE by expert neither; by set among its own
        if (!(key in FI) || FW[i] < FW[FI[key]]) FI[key] = i
        if (!(key in BI) || MS[i] - FW[i] < MS[BI[key]] - FW[BI[key]]) BI[key] = i
    }
    if (!nk) return
    print ""
    print "== each layer's fastest path, as -at 1 runs it (the least forward + backward of its paths; BTT and Monarch: the fastest"
    print "   forward with the fastest backward of the paths that save z in the plans' layout, BTT-MoE of its paths by set, when less)"
    printf "%5s %-11s %-13s %10s %-26s %8s %8s %11s %9s\n", "d", "shape", "structure", "ms", "path", "%floor", "vs dense", "PyTorch ms", "speedup"
    n1 = n2 = n3 = n4 = m1 = m2 = m3 = m4 = 0; g1 = g2 = g3 = g4 = ""
    for (j = 1; j <= nk; j++) {
        key = order[j]; i = BEST[key]; t = MS[i]; how = path_name(S[i])
        if ((key in FI) && FI[key] != BI[key]) {
            fi = FI[key]; bi = BI[key]; pair = FW[fi] + MS[bi] - FW[bi]
            if (pair < t) { t = pair; how = sprintf("fwd %s, bwd %s", path_name(S[fi]), path_name(S[bi])) }
        }
        FT[key] = t
        dn = DIN[i] "/" DOUT[i]
        fl = FL[i]; tm = TM[i]
        sp = isnum(tm) ? sprintf("%.2fx", tm / t) : "-"
        printf "%5d %-11s %-13s %10.3f %-26s %7.1f%% %8s %11s %9s\n", KD[key], KIN[key] "->" KOUT[key], KS[key], t, how,
               (fl > 0 ? 100.0 * fl / t : 0), ((KD[key] "/" dn) in DENSE ? sprintf("%.3f", t / DENSE[KD[key] "/" dn]) : "-"),
               (isnum(tm) ? sprintf("%.3f", tm) : "-"), sp
        tag = KS[key] " d=" KD[key] (KOUT[key] == KIN[key] ? " (sq)" : "")
        n1++; if (!(t <= 1.5 * fl)) { m1++; g1 = g1 sprintf("%s %s %.1fx", (g1 == "" ? "" : ","), tag, t / fl) }
        if (isnum(tm)) { n2++; if (!(tm / t >= 2.0)) { m2++; g2 = g2 sprintf("%s %s %.2fx", (g2 == "" ? "" : ","), tag, tm / t) } }
        if (KD[key] >= 1024 && KS[key] ~ /^(btt_r[124]|monarch_)/ && ((KD[key] "/" dn) in DENSE)) {
            n3++; if (!(t < DENSE[KD[key] "/" dn])) { m3++; g3 = g3 sprintf("%s %s %.2fx", (g3 == "" ? "" : ","), tag, t / DENSE[KD[key] "/" dn]) }
        }
    }
    for (j = 1; j <= nk; j++) {
        key = order[j]
        if (KS[key] !~ /^btt_moe_8x2$/) continue
        r2 = KD[key] "/" KIN[key] "/" KOUT[key] "/btt_r2"
        if (!(r2 in FT)) continue
        tag = KS[key] " d=" KD[key] (KOUT[key] == KIN[key] ? " (sq)" : "")
        n4++; if (!(FT[key] <= 1.5 * FT[r2])) { m4++; g4 = g4 sprintf("%s %s %.2fx", (g4 == "" ? "" : ","), tag, FT[key] / FT[r2]) }
    }
    print ""
    print "goals (issue 5), each layer on its fastest path:"
    printf "  %-4s within 1.5x of the roofline floor: %d of %d%s\n", ((n1 && !m1) ? "PASS" : "MISS"), n1 - m1, n1, (m1 ? "; misses (time/floor):" g1 : "")
    if (n2) printf "  %-4s >= 2x faster than the PyTorch version: %d of %d%s\n", (m2 ? "MISS" : "PASS"), n2 - m2, n2, (m2 ? "; misses (speedup):" g2 : "")
    if (n3) printf "  %-4s at width >= 1024, BTT rank <= 4 and Monarch faster than dense: %d of %d%s\n", (m3 ? "MISS" : "PASS"), n3 - m3, n3,
                   (m3 ? "; misses (time/dense):" g3 : "")
    if (n4) printf "  %-4s BTT-MoE 8/top-2 no more than 1.5x the time of BTT rank 2: %d of %d%s\n", (m4 ? "MISS" : "PASS"), n4 - m4, n4,
                   (m4 ? "; misses (time/btt_r2):" g4 : "")
}
