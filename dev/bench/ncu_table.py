"""dev/bench/ncu_table.py: the kernels of one training step, from Nsight Compute's raw CSV page.

    ncu -i step.ncu-rep --csv --page raw --metrics gpu__time_duration.sum,dram__bytes_read.sum,\
dram__bytes_write.sum,sm__throughput.avg.pct_of_peak_sustained_elapsed > step.csv
    python3 dev/bench/ncu_table.py step.csv [--peak-gbs 4800]

The raw page is a header row (one column per metric, "Kernel Name" among the others), a row of
units, then a row per kernel launch. Launches are grouped by kernel (the name without its template
arguments and parameters), longest total first: launches, total and mean time, share of the
step's kernel time, DRAM traffic's achieved bandwidth (and its fraction of --peak-gbs) and the
SM throughput ncu reports. dev/bench/ncu.sh runs it.
"""

import argparse
import csv
import sys

TIME = "gpu__time_duration.sum"
READ = "dram__bytes_read.sum"
WRITE = "dram__bytes_write.sum"
SM = "sm__throughput.avg.pct_of_peak_sustained_elapsed"

TIME_SCALE = {"nsecond": 1e-6, "ns": 1e-6, "usecond": 1e-3, "us": 1e-3, "msecond": 1.0, "ms": 1.0, "second": 1e3, "s": 1e3}
BYTE_SCALE = {"byte": 1.0, "Kbyte": 1e3, "Mbyte": 1e6, "Gbyte": 1e9, "Tbyte": 1e12, "KB": 1e3, "MB": 1e6, "GB": 1e9}


def short_name(name):
    """A kernel's name without 'void ', template arguments or parameters."""
    name = name.strip()
    if name.startswith("void "):
        name = name[5:]
    for stop in ("(", "<"):
        i = name.find(stop)
        if i > 0:
            name = name[:i]
    return name


def number(text):
    return float(text.replace(",", "")) if text.strip() not in ("", "n/a") else 0.0


def read_launches(lines):
    """(kernel, ms, bytes, sm_pct) per launch. Raises ValueError naming what is missing."""
    rows = list(csv.reader(lines))
    rows = [r for r in rows if r and not r[0].startswith("==")]  # ncu's own messages
    if len(rows) < 2:
        raise ValueError("no header and units rows: not ncu's --csv --page raw output")
    header, units = rows[0], rows[1]
    col = {name: i for i, name in enumerate(header)}
    for need in ("Kernel Name", TIME):
        if need not in col:
            raise ValueError("no column %r in the header (%s)" % (need, ", ".join(header[:12])))
    tscale = TIME_SCALE.get(units[col[TIME]].strip())
    if tscale is None:
        raise ValueError("unknown unit %r for %s" % (units[col[TIME]], TIME))
    out = []
    for r in rows[2:]:
        if len(r) < len(header):
            continue
        nbytes = 0.0
        for m in (READ, WRITE):
            if m in col:
                nbytes += number(r[col[m]]) * BYTE_SCALE.get(units[col[m]].strip(), 1.0)
        sm = number(r[col[SM]]) if SM in col else 0.0
        out.append((short_name(r[col["Kernel Name"]]), number(r[col[TIME]]) * tscale, nbytes, sm))
    return out


def table(launches, peak_gbs=0.0, top=40):
    """The per-kernel table as text lines."""
    groups = {}
    for name, ms, nbytes, sm in launches:
        g = groups.setdefault(name, [0, 0.0, 0.0, 0.0])
        g[0] += 1
        g[1] += ms
        g[2] += nbytes
        g[3] += sm * ms  # time-weighted
    total = sum(g[1] for g in groups.values())
    lines = ["%-58s %6s %10s %7s %9s %9s %6s" % ("kernel", "calls", "total ms", "share", "mean us", "DRAM GB/s", "SM %")]
    for name, (n, ms, nbytes, smw) in sorted(groups.items(), key=lambda kv: (-kv[1][1], kv[0]))[:top]:
        gbs = nbytes / (ms * 1e-3) / 1e9 if ms > 0 else 0.0
        bw = "%9.0f" % gbs + ("" if peak_gbs <= 0 else " (%3.0f%%)" % (100.0 * gbs / peak_gbs))
        lines.append("%-58s %6d %10.3f %6.1f%% %9.1f %s %6.1f" % (name[:58], n, ms, 100.0 * ms / total if total > 0 else 0.0,
                                                               1e3 * ms / n, bw, smw / ms if ms > 0 else 0.0))
    lines.append("%-58s %6d %10.3f %6.1f%%" % ("all kernels", sum(g[0] for g in groups.values()), total, 100.0))
    if len(groups) > top:
        lines.append("(%d more kernels not shown)" % (len(groups) - top))
    return lines


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("csv", help="ncu --csv --page raw output")
    ap.add_argument("--peak-gbs", type=float, default=0.0, help="the memory bandwidth to compare with (GB/s), 0: none")
    ap.add_argument("--top", type=int, default=40)
    a = ap.parse_args(argv)
    with open(a.csv, newline="") as f:
        try:
            launches = read_launches(f)
        except ValueError as e:
            print("error: %s: %s" % (a.csv, e), file=sys.stderr)
            return 1
    if not launches:
        print("error: %s: no kernel launches (did the profiled range hold the step? -pt 1 opens it at the last step)" % a.csv,
              file=sys.stderr)
        return 1
    print("\n".join(table(launches, a.peak_gbs, a.top)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
