"""scripts/compare_runs.py: runs side by side by step, tokens, training FLOPs and time.

The logs here are written by hand with numbers chosen so that every figure the report prints is
worked out in this file (interpolations, first crossings, cumulative time from tok/s). The
trainers' own run.txt and main.log go through it in tests/test_cli.sh.
"""

import importlib.util
import math
import os
import sys

import pytest

REPO_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
spec = importlib.util.spec_from_file_location("compare_runs", os.path.join(REPO_ROOT, "scripts", "compare_runs.py"))
cr = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cr)


def make_run(folder, log_lines, info=None):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "main.log"), "w") as f:
        f.write("".join(line + "\n" for line in log_lines))
    if info is not None:
        with open(os.path.join(folder, "run.txt"), "w") as f:
            f.write("# started 2026-12-03T11:00:00Z at step 0\n")
            f.write("".join(f"{k} = {v}\n" for k, v in info.items()))
    return str(folder)


def train_lines(steps, loss, tok_s):
    return [f"s:{s} trl:{loss(s):.4f} lr:0.000300 norm:1.00 tok/s:{tok_s(s):.0f}" for s in steps]


@pytest.fixture
def two_runs(tmp_path):
    """a: 10 FLOPs/token, val 10, 8, 6 at steps 0, 10, 20 (x = 0, 10000, 20000 FLOPs);
    b: 5 FLOPs/token, val 10, 9, 8, 7 at steps 0, 10, 20, 40 (x = 0, 5000, 10000, 20000).
    100 tokens per step; a runs at 100 tok/s (1 s a step), b at 50 then 200 tok/s."""
    a = make_run(tmp_path / "a", train_lines(range(1, 21), lambda s: 10 - 0.2 * s, lambda s: 100)
                 + ["s:0 tel:10.0000", "s:10 tel:8.0000", "s:20 tel:6.0000"],
                 {"parameters": 1000, "flops_per_token": 10, "tokens_per_step": 100})
    b = make_run(tmp_path / "b", train_lines(range(1, 41), lambda s: 10 - 0.1 * s, lambda s: 50 if s <= 20 else 200)
                 + ["s:0 tel:10.0000", "s:10 tel:9.0000", "s:20 tel:8.0000", "s:40 tel:7.0000"],
                 {"parameters": 500, "flops_per_token": 5, "tokens_per_step": 100})
    return a, b


def test_interpolate_and_first_reach():
    pts = [(0.0, 10.0), (10.0, 8.0), (20.0, 6.0)]
    assert cr.interpolate(pts, 15.0) == pytest.approx(7.0)
    assert cr.interpolate(pts, 20.0) == 6.0
    assert math.isnan(cr.interpolate(pts, 21.0))
    assert cr.first_reach(pts, 7.0) == pytest.approx(15.0)
    assert cr.first_reach(pts, 10.0) == 0.0
    assert math.isnan(cr.first_reach(pts, 5.0))
    # a curve that goes down, up and down again: the first crossing counts
    assert cr.first_reach([(0, 9.0), (1, 7.0), (2, 8.0), (3, 6.0)], 7.5) == pytest.approx(0.75)


def test_axes(two_runs):
    a, b = (cr.Run(p) for p in two_runs)
    assert a.x_of("step")(7) == 7
    assert a.x_of("tokens")(7) == 700
    assert b.x_of("flops")(40) == 40 * 100 * 5
    # time: step s ends after steps 1..s; b's first 20 take 2 s each, the next 0.5 s
    tb = b.x_of("time")
    assert tb(0) == 0.0
    assert tb(20) == pytest.approx(40.0)
    assert tb(40) == pytest.approx(50.0)
    assert a.x_of("time")(10) == pytest.approx(10.0)


def test_report_at_equal_flops(two_runs, capsys):
    assert cr.main([*two_runs, "--x", "flops"]) == 0
    out = capsys.readouterr().out
    # both reach 20000 FLOPs: a's val there is 6, b's 7
    assert "val loss at the same flops (20K, as far as every run got):" in out
    assert " 6.0000\n" in out and "7.0000  (+1.0000 vs a)" in out
    # the lowest level both reach is b's 7: a at 15000 (between 8 at 10000 and 6 at 20000), b at 20000
    assert "flops to reach val loss 7.0000" in out
    assert "15K\n" in out and "20K  (1.33x a's)" in out


def test_report_at_equal_time_and_baseline(two_runs, capsys):
    assert cr.main([*two_runs, "--x", "time", "--baseline", "b"]) == 0
    out = capsys.readouterr().out
    # a got to 20 s, b to 50 s; at 20 s b is at step 10, val 9; a at step 20, val 6
    assert "val loss at the same time (20.0s" in out
    assert "9.0000\n" in out and "6.0000  (-3.0000 vs b)" in out
    # val 7: b at step 40 = 50 s; a at step 15 = 15 s
    assert "50.0s\n" in out and "15.0s  (0.30x b's)" in out


def test_table_columns(two_runs, capsys):
    assert cr.main(list(two_runs)) == 0  # default axis: flops, as both have run.txt
    out = capsys.readouterr().out.splitlines()
    row = next(line for line in out if line.startswith("b "))
    words = row.split()
    # params, FLOP/tok, steps, tokens, train (mean of steps 21..40: 10 - 0.1*30.5), val, best, eval, tok/s, time
    assert words[1:] == ["500", "5", "40", "4K", f"{10 - 0.1 * 30.5:.4f}", "7.0000", "7.0000", "-", "125", "50.0s"]


def test_resumed_log_keeps_the_later_line(tmp_path):
    # a crash after step 3, resumed from the step-2 checkpoint: step 3 is logged twice
    p = make_run(tmp_path / "r", ["s:1 trl:5.0", "s:2 trl:4.0", "s:3 trl:3.5", "s:3 trl:3.0", "s:4 trl:2.0"])
    r = cr.Run(p)
    assert r.train == {1: 5.0, 2: 4.0, 3: 3.0, 4: 2.0}


def test_llmc_log_without_run_txt(tmp_path, capsys):
    # llm.c's own main.log: no tok/s, no run.txt
    p = make_run(tmp_path / "llmc", ["s:0 tel:10.0", "s:1 trl:9.0 lr:0.0006 norm:1.0", "s:2 trl:8.0 lr:0.0006 norm:1.0",
                                     "s:2 tel:8.5", "s:2 eval:0.2500"])
    assert cr.main([p]) == 0  # the default axis falls back to step
    assert cr.main([p, "--x", "tokens"]) == 1
    assert "has no run.txt" in capsys.readouterr().err
    assert cr.main([p, "--x", "tokens", "--tokens_per_step", "524288"]) == 0
    assert cr.main([p, "--x", "time", "--tokens_per_step", "524288"]) == 1
    assert "no tok/s for step 1" in capsys.readouterr().err
    r = cr.Run(p)
    assert r.eval == {2: 0.25}


@pytest.mark.parametrize("case", ["bad_line", "missing", "dup_label", "baseline", "bad_info", "empty", "smooth"])
def test_errors(tmp_path, capsys, two_runs, case):
    if case == "bad_line":
        p = make_run(tmp_path / "x", ["s:1 trl:5.0", "step 2 loss 4.0"])
        args, want = [p], "main.log:2: 'step 2 loss 4.0' is not a main.log line"
    elif case == "missing":
        args, want = [str(tmp_path / "nope")], "no such main.log or run folder"
    elif case == "dup_label":
        args, want = [two_runs[0], "a=" + two_runs[1]], "two runs are labelled 'a'; name them: LABEL=PATH"
    elif case == "baseline":
        args, want = [*two_runs, "--baseline", "c"], "--baseline c: no such run; the labels are a, b"
    elif case == "bad_info":
        p = make_run(tmp_path / "y", ["s:1 trl:5.0"], {"tokens_per_step": "many"})
        args, want = [p], "run.txt's tokens_per_step = 'many' is not a number"
    elif case == "empty":
        p = make_run(tmp_path / "z", [])
        args, want = [p], "no train (trl) or val (tel) lines yet"
    else:
        args, want = [*two_runs, "--smooth", "0"], "--smooth 0: give a number of steps >= 1"
    assert cr.main(args) == 1
    cap = capsys.readouterr()
    assert want in cap.err
    assert cap.out == ""  # nothing half-printed before the error


def test_labels(two_runs, capsys):
    assert cr.main(["dense=" + two_runs[0], "btt=" + two_runs[1], "--x", "step"]) == 0
    out = capsys.readouterr().out
    assert "(+" in out and "vs dense)" in out and "\nbtt " in out


def test_plot(two_runs, tmp_path, capsys):
    pytest.importorskip("matplotlib")  # requirements.txt installs it, so CI runs this
    png = str(tmp_path / "runs.png")
    open(png, "wb").write(b"old")
    assert cr.main([*two_runs, "--plot", png, "--x", "tokens", "--logx"]) == 0
    data = open(png, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10000
    assert not os.path.exists(png + ".tmp.png")


def test_plot_without_matplotlib(two_runs, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    png = tmp_path / "runs.png"
    assert cr.main([*two_runs, "--plot", str(png)]) == 1
    cap = capsys.readouterr()
    assert "--plot needs matplotlib: python3 -m pip install matplotlib" in cap.err and cap.out == ""
    assert not png.exists()


def test_csv(two_runs, tmp_path, capsys):
    import csv
    path = str(tmp_path / "runs.csv")
    assert cr.main([*two_runs, "--csv", path]) == 0
    rows = list(csv.DictReader(open(path)))
    b = [r for r in rows if r["run"] == "b"]
    assert [int(r["step"]) for r in b] == list(range(0, 41))  # val at 0, train 1..40
    r20 = next(r for r in b if r["step"] == "20")
    # step 20 of b: 2000 tokens, 10000 FLOPs, 40 s; train 10 - 0.1*20, val 8, tok/s 50
    assert (float(r20["tokens"]), float(r20["flops"]), float(r20["time_s"])) == (2000.0, 10000.0, 40.0)
    assert (float(r20["train_loss"]), float(r20["val_loss"]), r20["eval_acc"], float(r20["tok_s"])) == (8.0, 8.0, "", 50.0)
    assert next(r for r in b if r["step"] == "0")["train_loss"] == ""


def test_csv_routing(tmp_path):
    """A BTT-MoE run's aux loss, balance term and expert loads (main.log's aux, bal, lmax, lmin)
    are CSV columns; a dense run leaves them empty."""
    import csv
    moe = make_run(tmp_path / "moe", ["s:1 trl:5.0000 lr:0.000300 norm:1.00 aux:1.4321 bal:1.0125 lmax:2.250 lmin:0.000 tok/s:100",
                                      "s:2 trl:4.0000 lr:0.000300 norm:1.00 aux:1.2000 bal:1.0010 lmax:1.100 lmin:0.900 tok/s:100"],
                   {"parameters": 10, "flops_per_token": 10, "tokens_per_step": 100})
    dense = make_run(tmp_path / "dense", train_lines(range(1, 3), lambda s: 5.0, lambda s: 100),
                     {"parameters": 10, "flops_per_token": 10, "tokens_per_step": 100})
    path = str(tmp_path / "r.csv")
    assert cr.main([moe, dense, "--csv", path]) == 0
    rows = {(r["run"], r["step"]): r for r in csv.DictReader(open(path))}
    m1, m2, d1 = rows[("moe", "1")], rows[("moe", "2")], rows[("dense", "1")]
    assert [float(m1[k]) for k in ("aux", "bal", "lmax", "lmin")] == [1.4321, 1.0125, 2.25, 0.0]
    assert [float(m2[k]) for k in ("aux", "bal", "lmax", "lmin")] == [1.2, 1.001, 1.1, 0.9]
    assert [d1[k] for k in ("aux", "bal", "lmax", "lmin")] == ["", "", "", ""]


def test_routing_table(tmp_path, capsys):
    """BTT-MoE runs get a routing block: aux, bal, lmax, lmin as means of the last 20 logged steps
    (here steps 6..25 of 25, whose values are worked out below); a dense run has no row in it."""
    lines = [f"s:{s} trl:5.0000 lr:0.000300 norm:1.00 aux:{1 + 0.01 * s:.4f} bal:{1 + 0.001 * s:.4f} "
             f"lmax:{1 + 0.1 * s:.3f} lmin:{0.5:.3f} tok/s:100" for s in range(1, 26)]
    moe = make_run(tmp_path / "moe", lines, {"parameters": 10, "flops_per_token": 10, "tokens_per_step": 100})
    dense = make_run(tmp_path / "dense", train_lines(range(1, 26), lambda s: 5.0, lambda s: 100),
                     {"parameters": 10, "flops_per_token": 10, "tokens_per_step": 100})
    assert cr.main([moe, dense]) == 0
    out = capsys.readouterr().out.splitlines()
    head = out.index(next(line for line in out if line.startswith("routing ")))
    assert out[head].split() == ["routing", "aux", "bal", "lmax", "lmin"]
    assert out[head + 1].split() == ["moe", f"{1 + 0.01 * 15.5:.4f}", f"{1 + 0.001 * 15.5:.4f}", f"{1 + 0.1 * 15.5:.3f}", "0.500"]
    assert out[head + 2].startswith("routing: ")
    assert not any(line.startswith("routing") for line in out if "dense" in line)


def test_no_routing_table_for_dense(two_runs, capsys):
    assert cr.main(list(two_runs)) == 0
    assert not any(line.startswith("routing") for line in capsys.readouterr().out.splitlines())
