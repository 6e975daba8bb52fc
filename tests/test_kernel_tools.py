"""The kernel inspection tools. kernels_resources.py (ahead of time): how it finds the main loop in
SASS, which arguments get the JIT's divisibility hints, and one real sm_90 compile of a kernel read
end to end (no GPU needed: Triton ships ptxas and cuobjdump). kernels_profile.py: what it reads
from Nsight Compute's exported CSV pages. kernels_table.py: how its ratios and target verdicts
follow the two timings (events, graph replay)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():  # as test_cuda_ops does, before triton and the kernels are imported:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # whichever test file imports them first fixes their mode
pytest.importorskip("triton")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks" / "scripts"))
import kernels_profile as kp  # noqa: E402
import kernels_resources as kr  # noqa: E402
import kernels_table as kt  # noqa: E402


def sass(lines):
    """cuobjdump-like text: one '/*addr*/ INSTR ;' per line, 16 bytes apart."""
    return "\n".join(f"        /*{16 * i:04x}*/                   {text} ;" for i, text in enumerate(lines))


def test_main_loop_is_the_shortest_innermost_loop_with_the_most_mma_work():
    body = ["FFMA R1, R2, R3, R4", "HGMMA.64x64x16.F32.BF16 R8, gdesc[UR4], R8", "HGMMA.64x128x16.F32.BF16 R8, R9, gdesc[UR8], R8"]
    masked = ["ISETP.GE.AND P0, PT, R1, R2, PT", "FSEL R3, R3, RZ, P0"] + body
    text = sass(["MOV R0, RZ",  # 0x0000
                 *masked, "BRA 0x10",  # masked loop: 0x0010 .. 0x0060 (6 instructions)
                 *body, "BRA 0x70",  # unmasked loop: 0x0070 .. 0x00a0 (4 instructions)
                 "BRA 0x0",  # an outer loop around both: not innermost
                 "EXIT"])
    assert kr.main_loop(text) == f"4 / {(64 * 64 * 16 + 64 * 128 * 16) // 1024}k"
    assert kr.main_loop(sass(["FFMA R1, R2, R3, R4", "BRA 0x0", "EXIT"])) == "-"  # loops without MMAs


def test_exponentials_under_mma_count_only_those_issued_while_a_group_is_in_flight():
    body = ["WARPGROUP.ARRIVE", "HGMMA.64x64x16.F32.BF16 R8, gdesc[UR4], R8", "MUFU.EX2 R1, R1",  # group 1 opens
            "HGMMA.64x64x16.F32.BF16 R8, gdesc[UR4], R8, gsb0",  # and is committed
            "WARPGROUP.ARRIVE", "HGMMA.64x128x16.F32.BF16 R40, R9, gdesc[UR8], R40, gsb0",  # group 2
            "WARPGROUP.DEPBAR.LE gsb0, 0x1", "MUFU.EX2 R2, R2",  # group 2 still in flight: counts
            "WARPGROUP.DEPBAR.LE gsb0, 0x0", "MUFU.EX2 R3, R3"]  # nothing in flight: does not
    assert kr.exps_under_mma(sass(["MOV R0, RZ", *body, "BRA 0x10", "EXIT"])) == "2 / 3"
    hoisted = body[:6] + ["WARPGROUP.DEPBAR.LE gsb0, 0x0", "MUFU.EX2 R2, R2", "MUFU.EX2 R3, R3"]  # waits first
    assert kr.exps_under_mma(sass(["MOV R0, RZ", *hoisted, "BRA 0x10", "EXIT"])) == "1 / 3"
    assert kr.exps_under_mma(sass(["MUFU.EX2 R1, R1", "BRA 0x0", "EXIT"])) == "-"


def test_pointers_and_strides_get_the_jit_hints_and_head_count_and_scales_do_not():
    fn, pointers = kr.KERNELS["dkdv"]
    consts = dict(D=64, DV=128, K_STEP=2, SHARED_K=False, BLOCK_M=32, BLOCK_N=128, PREC="tf32",
                  SCALAR_LAM=True, DIAGONAL="last", GROUP=1)
    sig = kr.signature(fn, pointers, consts)
    hinted = {fn.arg_names[i] for (i,) in kr.jit_divisibility(fn, sig)}
    assert {"Q", "K", "V", "DO", "LSE", "DELTA", "sql", "skh", "L"} <= hinted
    assert not hinted & {"H", "qk_scale", "sm_scale", "GROUP", "BLOCK_M", "DIAGONAL"}


def json_of_fresh_process(code):
    """The JSON that `code` prints last, run with benchmarks/scripts importable in a fresh process
    without TRITON_INTERPRET (the interpreter tests set it in this one, and interpreted kernels cannot
    be compiled)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parent.parent
    r = subprocess.run([sys.executable, "-c", "import json, sys; sys.path.insert(0, 'benchmarks/scripts'); " + code],
                       cwd=root, env={**env, "PYTHONPATH": str(root)}, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_a_kernel_compiles_for_sm90_and_every_column_is_read():
    row = json_of_fresh_process("import kernels_resources as kr; "
                                "print(json.dumps(kr.resources('dq', 'diff_v2', 64, (64, 64, 4, 2), tma=False, arch=90)))")
    assert 0 < row["regs"] <= 255 and row["stack"] >= 0
    assert row["wgmma"] in ("pipelined", "serialized")
    under, total = map(int, row["ex2_under_mma"].split(" / "))
    assert 0 <= under <= total and total > 0
    assert row["HGMMA"] > 0 and row["MUFU.EX2"] > 0
    n, work = row["loop"].split(" / ")
    assert int(n) > 0 and work.endswith("k") and int(work[:-1]) > 0


def test_idle_gaps_count_only_time_when_no_kernel_runs():
    import step_gaps
    spans = [(0, 10, "a"), (5, 20, "b"), (8, 12, "c"), (50, 60, "d"), (61, 70, "e")]  # b overlaps a and c
    assert step_gaps.idle_gaps(spans) == [(30, "b", "d"), (1, "d", "e")]


# ---- kernels_profile.py: what it reads from Nsight Compute's CSV pages ----------------------------


def csv_text(rows):
    return "\n".join(",".join(f'"{c}"' for c in row) for row in rows) + "\n"


def test_profile_kernel_table_converts_units_and_leaves_out_short_kernels(tmp_path):
    stall = "smsp__average_warps_issue_stalled_{}_per_issue_active.ratio"
    header = ["ID", "Kernel Name", "gpu__time_duration.sum", "sm__pipe_tensor_cycles_active.avg.pct_of_peak_sustained_active",
              "dram__bytes.sum.per_second", stall.format("barrier"), stall.format("long_scoreboard"),
              stall.format("selected")]
    raw = tmp_path / "x_raw.csv"
    raw.write_text(csv_text([header, ["", "", "usecond", "%", "Gbyte/s", "", "", ""],
                             ["0", "paired_attention_bwd_dq", "1642.08", "53.04", "791", "1.13", "1.83", "1"],
                             ["1", "void at::native::fill(int)", "2.2", "0", "10", "0", "0", "1"]]))
    table = kp.kernel_table(str(raw)).splitlines()
    assert len(table) == 3  # heading, rule, one kernel: the 2 us fill is under MIN_MS
    cells = [c.strip() for c in table[2].split("|")[1:-1]]
    assert cells[:4] == ["paired_attention_bwd_dq", "1.642", "53.0", "0.79"]  # ms, %, TB/s
    assert cells[4] == "long_scoreboard 1.83, barrier 1.13, selected 1.00"  # most waited-on first


def test_profile_hotspots_sum_samples_by_reason_and_opcode_once_per_kernel(tmp_path):
    cols = ["Address", "Source", "Warp Stall Sampling (All Samples)", "stall_barrier", "stall_long_sb",
            "stall_barrier (Not Issued)"]
    block = [["Kernel Name", "paired_attention_bwd_dq"], cols,
             ["0x10", "  WARPGROUP.DEPBAR.LE gsb0, 0x0", "30", "30", "0", "29"],
             ["0x20", "  @!P0  BRA 0x7f00", "60", "0", "60", "0"],
             ["0x30", "  MUFU.EX2 R1, R1", "10", "5", "5", "0"]]
    other = [["Kernel Name", "void at::native::fill(int)"], cols, ["0x0", "  EXIT", "99", "99", "0", "0"]]
    src = tmp_path / "x_source.csv"
    src.write_text(csv_text(block + other + block))  # a kernel launched twice appears twice
    lines = kp.source_hotspots(str(src), ("paired_attention_bwd_dq",))
    assert lines[0] == "paired_attention_bwd_dq: 100 samples over 3 SASS instructions"
    assert lines[1] == "  by stall reason: long_sb 65.0%, barrier 35.0%"  # 'Not Issued' columns not counted twice
    assert lines[2] == "  by opcode: BRA 60.0%, WARPGROUP.DEPBAR.LE 30.0%, MUFU 10.0%"
    assert lines[3].split()[:3] == ["60.0%", "@!P0", "BRA"] and lines[3].endswith("mostly long_sb")
    assert len(lines) == 3 + 3  # the fill is not one of the kernels asked for; the repeat is skipped


def _table_rows(variant, L, fused, cudnn, flash, mode="fwd+bwd"):
    """kernels_table rows of one (variant, L, mode): (events ms, graph ms or None) per impl."""
    rows = []
    for impl, (ms, graph_ms) in (("fused", fused), ("composed:cudnn", cudnn), ("composed:flash", flash)):
        row = dict(variant=variant, d=64, L=L, B=16384 // L, mode=mode, impl=impl, ms=ms)
        if graph_ms is not None:
            row["graph_ms"] = graph_ms
        rows.append(row)
    return rows


def test_table_ratios_take_the_fastest_composed_backend_per_timing():
    """Each timing has its own best composed backend: here cuDNN by events, flash by graph replay."""
    rows = _table_rows("diff_v2", 1024, fused=(1.6, 0.9), cudnn=(1.4, 1.4), flash=(1.9, 1.2))
    kt.add_ratios(rows)
    fused = rows[0]
    assert fused["best_composed"] == "composed:cudnn" and fused["vs_best_composed"] == pytest.approx(1.4 / 1.6)
    assert fused["graph_best_composed"] == "composed:flash"
    assert fused["graph_vs_best_composed"] == pytest.approx(1.2 / 0.9)


@pytest.mark.slow
def test_the_compiled_composed_path_competes_for_best_composed():
    """Every composed impl the GPU table times, torch.compile's among them, is a candidate for
    "best composed": here the compiled one is fastest, so the fused row is judged against it."""
    names = [n for n in kt.impls("diff_v1", "cuda") if n.startswith("composed")]
    assert "composed:cudnn+compile" in names
    rows = [dict(variant="diff_v1", d=64, L=2048, B=8, mode="fwd", impl=n, ms=1.5, graph_ms=1.5) for n in names]
    rows[names.index("composed:cudnn+compile")].update(ms=1.1, graph_ms=1.1)
    rows.append(dict(variant="diff_v1", d=64, L=2048, B=8, mode="fwd", impl="fused", ms=1.0, graph_ms=1.0))
    kt.add_ratios(rows)
    assert rows[-1]["graph_best_composed"] == "composed:cudnn+compile"
    assert rows[-1]["graph_vs_best_composed"] == pytest.approx(1.1)


def test_cudnn_calls_alone_bound_target_1_without_competing_for_best_composed():
    """cuDNN's attention calls alone are no implementation of the op: the fused row is still judged
    against the fastest composed row, and the bound line reads calls / fused per L, forward only."""
    assert "cudnn-calls-only" in kt.impls("diff_v1", "cuda")
    rows = []
    for L in kt.LENGTHS:
        for mode, scale in (("fwd", 1.0), ("fwd+bwd", 3.0)):
            for impl, ms in (("fused", 1.0), ("composed:cudnn+compile", 1.1), ("cudnn-calls-only", 0.9 + L / 1e5)):
                rows.append(dict(variant="diff_v1", d=64, L=L, B=16384 // L, mode=mode, impl=impl, ms=ms * scale,
                                 graph_ms=ms * scale))
    kt.add_ratios(rows)
    fused = next(r for r in rows if r["impl"] == "fused")
    assert fused["graph_best_composed"] == "composed:cudnn+compile"
    bound = [t for t in kt.targets(rows, mm=700.0) if t.startswith("1. bound")]
    assert len(bound) == 1 and bound[0].startswith("1. bound: V1 d64 fused fwd against")
    assert f"L=2048: {0.9 + 2048 / 1e5:.2f}x" in bound[0] and f"L=16384: {0.9 + 16384 / 1e5:.2f}x" in bound[0]


def test_table_targets_judge_gpu_time_where_rows_have_it():
    """Target 3 reads the graph replay's ratio (a host-bound event row does not fail it) and, where
    a row has no graph time, the event ratio; both are printed."""
    def target3(rows):
        kt.add_ratios(rows)
        return next(t for t in kt.targets(rows, mm=700.0) if t.startswith("3."))

    host_bound = [r for L in kt.LENGTHS for r in _table_rows("diff_v2", L, fused=(1.6 if L == 1024 else 1.0, 0.9),
                                                             cudnn=(1.4, 1.4), flash=(2.0, 2.0))]
    verdict = target3(host_bound)
    assert ": MET" in verdict and f"L=1024: {1.4 / 0.9:.2f}x vs composed:cudnn (events {1.4 / 1.6:.2f}x)" in verdict
    events_only = [r for L in kt.LENGTHS for r in _table_rows("diff_v2", L, fused=(1.6 if L == 1024 else 1.0, None),
                                                              cudnn=(1.4, None), flash=(2.0, None))]
    assert "NOT MET" in target3(events_only)


def test_kernel_options_parse_to_the_types_the_launchers_compare():
    from benchmarks._common import kernel_options
    from backends.cuda.ops.paired.tuning import KernelOptions
    got = kernel_options("tma=0+dq_ws=1+dq_ws_v2_min_len=4096+diagonal=last+dkdv_pairs_together=auto")
    assert got == KernelOptions(tma=False, dq_ws=True, dq_ws_v2_min_len=4096, diagonal="last")  # an int, not "4096"
    assert got.text() == "tma=0+diagonal=last"  # what differs from the defaults, in the same form
    assert kernel_options("") == KernelOptions() and KernelOptions().tag == ""
    with pytest.raises(SystemExit, match="unknown kernel option"):
        kernel_options("no_such_option=1")
    with pytest.raises(SystemExit, match="diagonal must be one of"):
        kernel_options("diagonal=sideways")


def test_tiles_option_overrides_the_tuned_tile_and_refuses_a_malformed_one():
    from benchmarks._common import kernel_options
    from backends.cuda.ops.paired import tuning

    options = kernel_options("", "dkdv:64:128=32,128,8,3+fwd:64:64=64,32,4,2")
    assert tuning.blocks("dkdv", 64, 128, torch.bfloat16, False, options) == (32, 128, 8, 3)
    assert dict(options.tiles) == {("dkdv", 64, 128, 2): (32, 128, 8, 3), ("fwd", 64, 64, 2): (64, 32, 4, 2)}
    assert tuning.blocks("dkdv", 64, 128, torch.bfloat16, False) != (32, 128, 8, 3)  # the defaults untouched
    assert options.tag and options.tag != kernel_options("", "dkdv:64:128=32,128,8,2").tag
    for bad in ("dkdv:64:128=32,128,8", "nope:64:128=32,128,8,3", "dkdv:64=32,128,8,3"):
        with pytest.raises(SystemExit, match="bad tile"):
            kernel_options("", bad)


@pytest.mark.slow
def test_kernel_table_runs_under_given_kernel_options_and_records_them(tmp_path):
    """--kernel-options gives the fused rows those KernelOptions (an A/B of a launch option in one
    call) and the header says which; an option KernelOptions lacks stops the run. The smoke mode
    runs the interpreter on CPU, in a process of its own (it sets TRITON_INTERPRET)."""
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "scripts" / "kernels_table.py"
    env = {**os.environ, "PYTHONPATH": str(script.parent.parent.parent)}

    def table(options):
        return subprocess.run([sys.executable, str(script), "--smoke", "--out", str(tmp_path), "--kernel-options",
                               options], capture_output=True, text=True, env=env, timeout=600)

    done = table("dq_ws=0+dkdv_pairs_together=2")
    assert done.returncode == 0, done.stderr[-2000:]
    header = json.loads((tmp_path / "kernels_table.json").read_text())["header"]
    assert header["kernel_options"] == "dq_ws=0+dkdv_pairs_together=2"
    bogus = table("bogus=1")
    assert bogus.returncode != 0 and "unknown kernel option(s) ['bogus']" in bogus.stderr


@pytest.mark.slow
def test_kernel_table_with_subln_normalizes_every_v1_path(tmp_path):
    """--subln gives every V1 implementation the output RMSNorm (target 1's composed path: two SDPA
    calls + combine + subln), the torch.compile'd composed path included; every row meets the normed
    float32 reference, which an unnormed output (rows of RMS ~0.3, not 1) would miss by far more
    than float16's tolerance."""
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "scripts" / "kernels_table.py"
    env = {**os.environ, "PYTHONPATH": str(script.parent.parent.parent)}
    done = subprocess.run([sys.executable, str(script), "--smoke", "--subln", "--variants", "diff_v1", "--out",
                           str(tmp_path)], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    table = json.loads((tmp_path / "kernels_table.json").read_text())
    assert table["header"]["subln"] is True
    rows = {(r["L"], r["mode"], r["impl"]): r for r in table["rows"]}
    for L in (16, 32):
        for mode in ("fwd", "fwd+bwd"):
            for impl in ("fused", "composed", "composed+compile", "naive"):
                assert rows[(L, mode, impl)]["err"] < 1e-2, (L, mode, impl, rows[(L, mode, impl)])
            calls = rows[(L, mode, "sdpa-calls-only")]  # timed, but not the op: no error against it
            assert calls["ms"] > 0 and "err" not in calls and "note" not in calls
