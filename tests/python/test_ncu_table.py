"""dev/bench/ncu_table.py: the per-kernel table of a step from ncu's raw CSV page.

The CSV is written here in the raw page's layout (header, units, a row per launch), with values
chosen so that every figure of the table is worked out by hand below.
"""

import importlib.util
import os

import pytest

REPO_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
spec = importlib.util.spec_from_file_location("ncu_table", os.path.join(REPO_ROOT, "dev", "bench", "ncu_table.py"))
nt = importlib.util.module_from_spec(spec)
spec.loader.exec_module(nt)

HEADER = ('"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size","Grid Size","Device","CC",'
          '"dram__bytes_read.sum","dram__bytes_write.sum","gpu__time_duration.sum","sm__throughput.avg.pct_of_peak_sustained_elapsed"')
UNITS = '"","","","","","","","","","","","Mbyte","Mbyte","usecond","%"'


def row(i, kernel, read_mb, write_mb, us, sm):
    return '"%d","1","train_gpt2cu","h","%s","1","7","(256, 1, 1)","(96, 1, 1)","0","9.0","%s","%s","%s","%s"' % (
        i, kernel, read_mb, write_mb, us, sm)


def csv_lines(rows):
    return ["==PROF== Connected to process 1", HEADER, UNITS] + rows


def test_groups_launches_by_kernel_and_works_out_bandwidth():
    rows = [
        row(0, "void layernorm_forward_kernel<128>(float*, const float*, int)", "3", "1", "2", "40"),
        row(1, "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64", "10", "2", "100", "80"),
        row(2, "void layernorm_forward_kernel<128>(float*, const float*, int)", "3", "1", "6", "60"),
        row(3, "adamw_kernel(float*, float*)", "1,000", "500", "500", "10"),
    ]
    launches = nt.read_launches(csv_lines(rows))
    assert [l[0] for l in launches] == ["layernorm_forward_kernel", "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64",
                                        "layernorm_forward_kernel", "adamw_kernel"]
    assert launches[0][1] == pytest.approx(0.002) and launches[0][2] == pytest.approx(4e6)
    lines = nt.table(launches, peak_gbs=4000.0)
    assert lines[1].startswith("adamw_kernel") and lines[2].startswith("sm90_xmma_gemm") and lines[3].startswith("layernorm_forward_kernel")
    # adamw: 1.5 GB in 0.5 ms = 3000 GB/s, 75% of 4000; share 500 / 608 us
    assert "     1      0.500   82.2%     500.0      3000 ( 75%)   10.0" in lines[1]
    # layernorm: 2 launches, 8 us, 8 MB -> 1000 GB/s; SM % weighted by time: (2*40 + 6*60) / 8 = 55
    assert "     2      0.008    1.3%       4.0      1000 ( 25%)   55.0" in lines[3]
    assert lines[-1].startswith("all kernels") and "     4      0.608  100.0%" in lines[-1]


def test_time_units_and_missing_columns():
    nanos = [HEADER, UNITS.replace("usecond", "nsecond"), row(0, "k", "0", "0", "2,500", "0")]
    assert nt.read_launches(nanos)[0][1] == pytest.approx(0.0025)
    with pytest.raises(ValueError, match="gpu__time_duration.sum"):
        nt.read_launches(['"ID","Kernel Name"', '"",""', '"0","k"'])
    with pytest.raises(ValueError, match="unknown unit"):
        nt.read_launches([HEADER, UNITS.replace("usecond", "cycle"), row(0, "k", "0", "0", "1", "0")])


def test_main_reports_an_empty_range(tmp_path, capsys):
    p = tmp_path / "empty.csv"
    p.write_text("\n".join([HEADER, UNITS]) + "\n")
    assert nt.main([str(p)]) == 1
    assert "no kernel launches" in capsys.readouterr().err
