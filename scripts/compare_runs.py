#!/usr/bin/env python3
"""Put training runs side by side: a table of each run's losses, speed and cost, the val loss of
every run at the same tokens, training FLOPs or time, and how much of that each run needed to
reach the same val loss; with --plot, the curves in a PNG.

A run is an -o folder of either trainer (its main.log, and run.txt for the model's size, FLOPs per
token and tokens per step), or a main.log alone (llm.c's too: then only --x step, unless
--tokens_per_step is given). LABEL=PATH names a run; by default it is the folder's name.

    python3 scripts/compare_runs.py out/dense out/btt4 out/moe --x flops
    python3 scripts/compare_runs.py dense=out/d12 btt=out/btt4 --x time --plot runs.png

x axes: step; tokens (step x tokens per step); flops (tokens x training FLOPs per token, as the
trainers' MFU counts them: 6 per multiply-add of every linear layer and the head, plus attention);
time (the sum of each step's tokens / tok/s, that is training time without val, sampling and
checkpoints). The first run is the baseline of the ratios (--baseline LABEL picks another).
"""
import argparse
import bisect
import math
import os
import statistics
import sys


class RunError(Exception):
    pass


AXES = ("step", "tokens", "flops", "time")


def parse_main_log(path):
    """llm.c's main.log: 's:<step> key:value ...' lines. Returns {'trl': {step: value}, ...}.
    A resumed run appends to the file and may log a step again; the later line counts."""
    streams = {}
    with open(path, "r", encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            words = line.split()
            if not words:
                continue
            try:
                key, value = words[0].split(":", 1)
                if key != "s":
                    raise ValueError
                step = int(value)
                fields = {}
                for w in words[1:]:
                    k, v = w.split(":", 1)
                    fields[k] = float(v)
            except ValueError:
                raise RunError(f"{path}:{lineno}: {line.strip()[:60]!r} is not a main.log line "
                               "('s:<step> key:value ...'); give the -o folder or main.log of a run") from None
            for k, v in fields.items():
                streams.setdefault(k, {})[step] = v
    return streams


def parse_run_info(path):
    """run.txt: 'key = value' lines (# comments), one block per start; the last value counts."""
    info = {}
    with open(path, "r", encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            text = line.strip()
            if not text or text.startswith("#"):
                continue
            if " = " not in text:
                raise RunError(f"{path}:{lineno}: {text[:60]!r} is not a 'key = value' line; "
                               "run.txt is written by the trainers, was it edited?")
            key, value = text.split(" = ", 1)
            info[key.strip()] = value.strip()
    return info


class Run:
    def __init__(self, spec, tokens_per_step=None):
        label, path = None, spec
        if "=" in spec and not os.path.exists(spec):
            label, path = spec.split("=", 1)
        if os.path.isdir(path):
            log = os.path.join(path, "main.log")
            folder = path
        else:
            log, folder = path, os.path.dirname(path) or "."
        if not os.path.isfile(log):
            raise RunError(f"'{path}': no such main.log or run folder; give an -o folder of a run or its main.log")
        self.label = label or os.path.basename(os.path.normpath(folder if os.path.isdir(path) else path))
        self.log = log
        self.streams = parse_main_log(log)
        info_path = os.path.join(folder, "run.txt")
        self.info = parse_run_info(info_path) if os.path.isfile(info_path) else {}
        self.tokens_per_step = self._number("tokens_per_step", tokens_per_step)
        self.flops_per_token = self._number("flops_per_token", None)
        self.params = self._number("parameters", None)
        self.train = self.streams.get("trl", {})
        self.val = self.streams.get("tel", {})
        self.eval = self.streams.get("eval", {})
        self.tok_s = self.streams.get("tok/s", {})
        if not self.train and not self.val:
            raise RunError(f"{log}: no train (trl) or val (tel) lines yet; has the run started?")

    def _number(self, key, fallback):
        if key not in self.info:
            return fallback
        try:
            return float(self.info[key])
        except ValueError:
            raise RunError(f"{self.log}: run.txt's {key} = {self.info[key]!r} is not a number") from None

    def x_of(self, axis):
        """A function step -> x on this axis (steps count optimizer updates)."""
        if axis == "step":
            return lambda s: float(s)
        if self.tokens_per_step is None:
            raise RunError(f"run '{self.label}' has no run.txt (with tokens_per_step) beside {self.log}; "
                           f"--x {axis} needs it: use --x step, or --tokens_per_step N for logs of other trainers")
        if axis == "tokens":
            return lambda s: s * self.tokens_per_step
        if axis == "flops":
            if self.flops_per_token is None:
                raise RunError(f"run '{self.label}': run.txt has no flops_per_token; --x flops needs it, use --x tokens")
            return lambda s: s * self.tokens_per_step * self.flops_per_token
        # time: step s ends once steps 1..s have run, each taking tokens_per_step / tok/s
        steps = sorted(self.train)
        missing = [s for s in steps if s not in self.tok_s or self.tok_s[s] <= 0]
        if missing:
            raise RunError(f"run '{self.label}': {self.log} has no tok/s for step {missing[0]} (llm.c's main.log has none); "
                           "--x time needs it, use --x tokens")
        cum, t = {0: 0.0}, 0.0
        for s in steps:
            t += self.tokens_per_step / self.tok_s[s]
            cum[s] = t
        known = sorted(cum)

        def at(s):
            i = max(0, bisect.bisect_right(known, s) - 1)
            return cum[known[i]]
        return at

    def train_tail_mean(self, n=20):
        return self.tail_mean("trl", n)

    def tail_mean(self, key, n=20):
        """The mean of main.log's key over the last n steps that logged it (nan if none)."""
        stream = self.streams.get(key, {})
        steps = sorted(stream)[-n:]
        return sum(stream[s] for s in steps) / len(steps) if steps else math.nan


def interpolate(points, x):
    """points: [(x, y)] in increasing x; y at x by linear interpolation (nan outside)."""
    if not points or x < points[0][0] - 1e-12 * abs(x) or x > points[-1][0] + 1e-12 * abs(x):
        return math.nan
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return points[-1][1]


def first_reach(points, level):
    """The first x at which the curve comes down to `level` (linear between points; nan if never)."""
    for i, (x, y) in enumerate(points):
        if y <= level:
            if i == 0:
                return x
            x0, y0 = points[i - 1]
            return x0 + (x - x0) * (y0 - level) / (y0 - y) if y0 != y else x
    return math.nan


def fmt_x(axis, x):
    if x is None or math.isnan(x):
        return "-"
    if axis == "step":
        return f"{x:.0f}"
    if axis == "time":
        return f"{x:.1f}s" if x < 600 else (f"{x / 60:.1f}min" if x < 36000 else f"{x / 3600:.2f}h")
    for unit, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def fmt(v, spec):
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def curves(run, axis):
    x = run.x_of(axis)
    return ([(x(s), run.train[s]) for s in sorted(run.train)],
            [(x(s), run.val[s]) for s in sorted(run.val)],
            [(x(s), run.eval[s]) for s in sorted(run.eval)])


def table(runs, axis, baseline):
    """The report, as lines of text."""
    out = []
    head = (f"{'run':<16} {'params':>9} {'FLOP/tok':>9} {'steps':>7} {'tokens':>8} {'train':>7} "
            f"{'val':>7} {'best val':>8} {'eval':>6} {'tok/s':>9} {'time':>9}")
    out.append(head)
    out.append("-" * len(head))
    for r in runs:
        last = max(r.train) if r.train else max(r.val)
        toks = last * r.tokens_per_step if r.tokens_per_step else math.nan
        tps = statistics.median(r.tok_s.values()) if r.tok_s else math.nan
        try:
            t = r.x_of("time")(last)
        except RunError:
            t = math.nan
        lv = r.val[max(r.val)] if r.val else math.nan
        bv = min(r.val.values()) if r.val else math.nan
        ev = r.eval[max(r.eval)] if r.eval else math.nan
        out.append(f"{r.label[:16]:<16} {fmt_x('tokens', r.params) if r.params else '-':>9} "
                   f"{fmt_x('flops', r.flops_per_token) if r.flops_per_token else '-':>9} {last:>7} "
                   f"{fmt_x('tokens', toks):>8} {fmt(r.train_tail_mean(), '.4f'):>7} {fmt(lv, '.4f'):>7} "
                   f"{fmt(bv, '.4f'):>8} {fmt(ev, '.4f'):>6} {fmt(tps, '.0f'):>9} {fmt_x('time', t):>9}")
    out.append("train: mean of the last 20 logged steps; val: the last; eval: the last HellaSwag accuracy; "
               "tok/s: the median step; time: training steps only")
    routed = [r for r in runs if "bal" in r.streams]
    if routed:  # BTT-MoE runs: the aux loss and the routing report (README: bal, load)
        out.append("")
        out.append(f"{'routing':<16} {'aux':>7} {'bal':>7} {'lmax':>7} {'lmin':>7}")
        for r in routed:
            out.append(f"{r.label[:16]:<16} " + " ".join(f"{fmt(r.tail_mean(k), '.4f' if k in ('aux', 'bal') else '.3f'):>7}"
                                                         for k in ("aux", "bal", "lmax", "lmin")))
        out.append("routing: BTT-MoE runs, mean of the last 20 logged steps; bal: the aux loss's balance term (1 = even); "
                   "lmax, lmin: the busiest and idlest expert's load (1 = even)")
    with_val = [r for r in runs if len(r.val) >= 1]
    if len(with_val) < 2:
        return out
    vals = {r.label: curves(r, axis)[1] for r in with_val}
    # the same x: as far as every run got
    common = min(pts[-1][0] for pts in vals.values())
    out.append("")
    out.append(f"val loss at the same {axis} ({fmt_x(axis, common)}, as far as every run got):")
    base = vals[baseline.label] if baseline in with_val else None
    for r in with_val:
        v = interpolate(vals[r.label], common)
        d = "" if base is None or r is baseline else f"  ({v - interpolate(base, common):+.4f} vs {baseline.label})"
        out.append(f"  {r.label:<16} {fmt(v, '.4f')}{d}")
    # the same val loss: the lowest that every run reached
    level = max(min(y for _, y in pts) for pts in vals.values())
    out.append(f"{axis} to reach val loss {level:.4f} (the lowest every run reached):")
    bx = first_reach(base, level) if base is not None else math.nan
    for r in with_val:
        x = first_reach(vals[r.label], level)
        ratio = "" if r is baseline or not bx > 0 else f"  ({x / bx:.2f}x {baseline.label}'s)"
        out.append(f"  {r.label:<16} {fmt_x(axis, x)}{ratio}")
    return out


def write_csv(runs, path):
    """One row per run and logged step: the step on every axis a run can give, and its values."""
    import csv
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", "step", "tokens", "flops", "time_s", "train_loss", "val_loss", "eval_acc", "lr", "norm", "aux", "bal", "lmax", "lmin", "tok_s"])
        for r in runs:
            xs = {}
            for axis in ("tokens", "flops", "time"):
                try:
                    xs[axis] = r.x_of(axis)
                except RunError:
                    xs[axis] = None
            cell = lambda d, s: "" if s not in d else repr(d[s])
            for s in sorted(set(r.train) | set(r.val) | set(r.eval)):
                w.writerow([r.label, s] + ["" if xs[a] is None else repr(xs[a](s)) for a in ("tokens", "flops", "time")]
                           + [cell(r.train, s), cell(r.val, s), cell(r.eval, s)]
                           + [cell(r.streams.get(k, {}), s) for k in ("lr", "norm", "aux", "bal", "lmax", "lmin", "tok/s")])
    os.replace(tmp, path)


def load_pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RunError("--plot needs matplotlib: python3 -m pip install matplotlib (or drop --plot for the table alone)") from None
    return plt


def plot(plt, runs, axis, path, smooth, logx=False):
    has_eval = any(r.eval for r in runs)
    n = 3 if has_eval else 2
    fig, axes = plt.subplots(1, n, figsize=(5.5 * n, 4.2))
    label = {"step": "step", "tokens": "tokens", "flops": "training FLOPs", "time": "training time (s)"}[axis]
    for r in runs:
        train, val, ev = curves(r, axis)
        if train:
            xs, ys = zip(*train)
            k = max(1, min(smooth, len(ys)))
            sm = [sum(ys[max(0, i - k + 1):i + 1]) / (i + 1 - max(0, i - k + 1)) for i in range(len(ys))]
            axes[0].plot(xs, sm, label=r.label)
        if val:
            axes[1].plot(*zip(*val), marker=".", label=r.label)
        if has_eval and ev:
            axes[2].plot(*zip(*ev), marker=".", label=r.label)
    titles = [f"train loss (mean of {smooth} steps)", "val loss", "HellaSwag accuracy"]
    for a, title in zip(axes, titles):
        a.set_title(title)
        a.set_xlabel(label)
        if logx:
            a.set_xscale("log")
        a.grid(alpha=0.3)
        a.legend()
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("runs", nargs="+", metavar="RUN", help="an -o folder or main.log, optionally LABEL=PATH")
    ap.add_argument("--x", choices=AXES, default=None,
                    help="what the runs are compared at (default: flops when every run has run.txt, else step)")
    ap.add_argument("--baseline", help="the run the others are compared with (its label; default: the first)")
    ap.add_argument("--plot", metavar="PNG", help="also draw train loss, val loss (and HellaSwag) against --x into this PNG")
    ap.add_argument("--logx", action="store_true", help="the plot's x axis on a log scale")
    ap.add_argument("--csv", metavar="FILE", help="also write every logged step of every run, on every axis, as CSV")
    ap.add_argument("--smooth", type=int, default=20, help="train loss: mean over this many steps in the plot (default 20)")
    ap.add_argument("--tokens_per_step", type=float, help="for logs without run.txt (llm.c's): tokens per optimizer step")
    args = ap.parse_args(argv)
    try:
        if args.smooth < 1:
            raise RunError(f"--smooth {args.smooth}: give a number of steps >= 1")
        runs = [Run(spec, args.tokens_per_step) for spec in args.runs]
        labels = [r.label for r in runs]
        dup = sorted({lab for lab in labels if labels.count(lab) > 1})
        if dup:
            raise RunError(f"two runs are labelled '{dup[0]}'; name them: LABEL=PATH")
        axis = args.x or ("flops" if all(r.flops_per_token and r.tokens_per_step for r in runs) else "step")
        baseline = runs[0]
        if args.baseline:
            match = [r for r in runs if r.label == args.baseline]
            if not match:
                raise RunError(f"--baseline {args.baseline}: no such run; the labels are {', '.join(labels)}")
            baseline = match[0]
        for r in runs:
            r.x_of(axis)  # a run that cannot give this axis says so before anything is printed
        plt = load_pyplot() if args.plot else None
        print("\n".join(table(runs, axis, baseline)))
        if args.plot:
            plot(plt, runs, axis, args.plot, args.smooth, args.logx)
            print(f"wrote {args.plot}")
        if args.csv:
            write_csv(runs, args.csv)
            print(f"wrote {args.csv}")
    except (RunError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
