"""The asv suite itself: it validates (`asv check`), a quick run completes with numbers where this
machine can measure and skips (never numbers) where it cannot, imports stay cheap, every track_
states its direction, and the FLOP counts match the conventions the docs state."""
import importlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MODULES = ("bench_kernels", "bench_training", "bench_agreement", "bench_paired", "bench_decode")


def _asv(tmp_path, *args, timeout=900):
    """asv on this checkout with results and envs in tmp_path (the committed results stay as they are)."""
    pytest.importorskip("asv")
    conf = json.loads("\n".join(l for l in (ROOT / "asv.conf.json").read_text().splitlines()
                                if not l.lstrip().startswith("//")))
    conf.update(repo=str(ROOT), benchmark_dir=str(ROOT / "benchmarks"), results_dir=str(tmp_path / "results"),
                env_dir=str(tmp_path / "env"), html_dir=str(tmp_path / "html"))
    (tmp_path / "asv.conf.json").write_text(json.dumps(conf))
    env = {**os.environ, "HOME": str(tmp_path), "ASV_PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "asv", *args, "--config", str(tmp_path / "asv.conf.json")]
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)


def test_committed_benchmarks_json_is_the_suite_as_asv_discovers_it(tmp_path):
    """asv rewrites results_dir/benchmarks.json on every run: committed in sync, a local or quick
    run leaves it unchanged (and the report's benchmark versions are the suite's)."""
    assert _asv(tmp_path, "machine", "--machine", "sync", "--yes").returncode == 0
    r = _asv(tmp_path, "run", "--python=same", "--machine", "sync", "--bench", "^$")  # discovers, runs none (exit 1)
    assert (tmp_path / "results" / "benchmarks.json").is_file(), r.stdout[-3000:] + r.stderr[-3000:]
    discovered = (tmp_path / "results" / "benchmarks.json").read_text()
    committed = (ROOT / "benchmarks" / "asv_results" / "benchmarks.json").read_text()
    assert committed == discovered, ("benchmarks/asv_results/benchmarks.json is stale: copy the one "
                                     f"`asv run --bench '^$'` writes ({tmp_path}/results/benchmarks.json)")


def test_median_seconds_returns_the_median_of_steady_calls():
    sys.path.insert(0, str(ROOT))
    from benchmarks import _common as C

    clock = _ScriptedClock([0.010, 0.011, 0.010, 0.012, 0.010, 0.011, 0.010])
    assert C.median_seconds(clock.call, lambda _: None, budget_s=1e9, max_reps=6, clock=clock) == pytest.approx(0.0105)


def test_median_seconds_refuses_a_median_its_own_loop_contradicts():
    """Nine 10 ms calls and one 500 ms stall: the median says 10 ms, the loop's wall time 59 ms
    per call, far beyond the samples' spread: no figure (the failure names both)."""
    sys.path.insert(0, str(ROOT))
    from benchmarks import _common as C

    clock = _ScriptedClock([0.01] * 10 + [0.5])
    with pytest.raises(C.Untrusted, match=r"median 10 ms but 59 ms per call"):
        C.median_seconds(clock.call, lambda _: None, budget_s=1e9, max_reps=10, clock=clock)


def test_check_timings_allows_disagreement_up_to_twice_the_measured_spread():
    sys.path.insert(0, str(ROOT))
    from benchmarks import _common as C

    times = [1.0, 1.0, 2.0, 2.0, 3.0, 3.0]  # median 2, quartiles 1 and 3: spread 100%
    assert C.check_timings(times, total=2.0 * 6 * 2.5)["noise"] == pytest.approx(1.0)  # 2.5x: within 200%
    with pytest.raises(C.Untrusted):
        C.check_timings(times, total=2.0 * 6 * 3.5)
    with pytest.raises(C.Untrusted):  # identical samples: only the 10% floor is allowed
        C.check_timings([1.0] * 5, total=5 * 1.2)


def test_median_seconds_on_a_cpu_refuses_a_loop_the_process_mostly_waited_through():
    """Ten 10 ms calls of which the process ran 4 ms each: 40% of the wall time, under the 50%
    that CPU work keeps; the same loop on a GPU (the host waits on the device) is reported."""
    sys.path.insert(0, str(ROOT))
    from benchmarks import _common as C

    def run(on_cpu):
        clock = _ScriptedClock([0.01] * 11, cpu_share=0.4)
        return C.median_seconds(clock.call, lambda _: None, budget_s=1e9, max_reps=10, on_cpu=on_cpu, clock=clock,
                                cpu_clock=clock.cpu)

    with pytest.raises(C.Untrusted, match="the process ran 40% of the timed loop's wall time"):
        run(on_cpu=True)
    assert run(on_cpu=False) == pytest.approx(0.01)


class _ScriptedClock:
    """A clock that only moves inside call(): each call takes the next of `durations` (the first
    is median_seconds' untimed warm-up)."""

    def __init__(self, durations, cpu_share=1.0):
        self.now, self.cpu_now, self.durations, self.cpu_share = 0.0, 0.0, iter(durations), cpu_share

    def __call__(self):
        return self.now

    def cpu(self):
        return self.cpu_now

    def call(self):
        step = next(self.durations)
        self.now += step
        self.cpu_now += self.cpu_share * step


@pytest.mark.slow
def test_asv_check_passes(tmp_path):
    r = _asv(tmp_path, "check", "--python=same")
    assert r.returncode == 0 and "No problems found" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]


def _gpu_visible():
    return os.path.exists("/dev/nvidiactl") or (sys.platform == "darwin" and os.uname().machine == "arm64")


@pytest.mark.slow
@pytest.mark.skipif(_gpu_visible(), reason="checks the CPU-only outcome of the quick run")
def test_quick_run_measures_what_a_cpu_can_and_skips_the_rest(tmp_path):
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    if not head:
        pytest.skip("not a git checkout")
    assert _asv(tmp_path, "machine", "--machine", "ci-cpu", "--yes").returncode == 0
    r = _asv(tmp_path, "run", "--python=same", "--quick", "--show-stderr", "--machine", "ci-cpu", "--set-commit-hash",
             head)
    if "Untrusted:" in r.stdout + r.stderr:  # the guard refused timings: other processes held the cores
        pytest.skip("this machine was too busy to measure: " + (r.stdout + r.stderr).split("Untrusted:")[1][:160])
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    files = list((tmp_path / "results" / "ci-cpu").glob(f"{head[:8]}-*.json"))
    assert len(files) == 1
    data = json.loads(files[0].read_text())
    col = data["result_columns"].index("result")
    pcol = data["result_columns"].index("params")
    have = {m: importlib.util.find_spec(m) is not None for m in ("torch", "mlx")}
    seen = set()
    for name, entry in data["results"].items():
        values, params = entry[col], entry[pcol]
        names = [p for p in params]
        combos = [()]
        for vs in names:
            combos = [c + (v.strip("'"),) for c in combos for v in vs]
        assert len(combos) == len(values), name
        for combo, value in zip(combos, values):
            assert value is not None, f"{name}{combo} failed (null): see asv's stderr"
            backend = combo[0] if combo and combo[0] in ("mlx", "torch") else None
            gpu_only = ("fused" in combo or "B2-L4096-d2048" in combo or "stage0" in combo or "stage1" in combo
                        or (backend == "torch" and "compiled" in combo))
            if gpu_only or (backend and not have["torch" if backend == "torch" else "mlx"]):
                assert math.isnan(value), f"{name}{combo} gave {value} on a CPU-only machine"
            elif name.endswith("track_tokens_per_second_vs_vanilla") and "vanilla" in combo:
                assert math.isnan(value)  # the twin itself: a skip, not 1.0
            elif name.endswith("track_device_peak_bytes") and backend == "torch":
                assert math.isnan(value)  # torch keeps no device allocator count on a CPU
            elif "Agreement" in name and not all(have.values()):
                assert math.isnan(value)
            else:
                assert math.isfinite(value), f"{name}{combo} = {value}"
                if not name.endswith(("_delta",)):
                    assert value >= 0, f"{name}{combo} = {value}"
                seen.add(name.rsplit(".", 1)[-1])
    if have["torch"]:
        assert {"time_forward", "time_forward_backward", "peakmem_forward", "track_tflops_forward",
                "time_train_step", "track_tokens_per_second", "track_tokens_per_second_vs_vanilla",
                "track_val_loss_delta", "track_mfu"} <= seen  # MFU on a CPU: against its measured matmul rate


def test_vs_vanilla_divides_by_the_twin_of_the_same_backend_and_preset():
    sys.path.insert(0, str(ROOT))
    from benchmarks.bench_training import _vs_vanilla

    cache = _vs_vanilla({
        ("torch", "vanilla", "stage1"): {"tokens_per_second": 400.0},
        ("torch", "diff", "stage1"): {"tokens_per_second": 368.0},
        ("torch", "diff", "tiny"): {"tokens_per_second": 50.0},  # its twin was not measured
        ("mlx", "vanilla", "stage1"): {"skip": "no GPU"},
        ("mlx", "diff", "stage1"): {"tokens_per_second": 10.0},
    })
    assert cache[("torch", "diff", "stage1")]["vs_vanilla"] == 368.0 / 400.0
    assert "vs_vanilla" not in cache[("torch", "diff", "tiny")]
    assert "vs_vanilla" not in cache[("mlx", "diff", "stage1")]
    assert "vs_vanilla" not in cache[("torch", "vanilla", "stage1")]


def test_importing_the_suite_loads_no_framework():
    code = ("import sys; sys.path.insert(0, %r)\n" % str(ROOT)
            + "".join(f"import benchmarks.{m}\n" for m in MODULES)
            + "print(sorted(m for m in ('torch', 'mlx', 'triton') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_the_suite_imports_against_a_commit_whose_diffattn_has_none_of_todays_modules(tmp_path):
    """asv's history (benchmarks/asv_history.sh) puts an older commit's code first on the path and
    discovers THIS suite against it: the suite's modules, and the package asv walks, must import with
    a diffattn that lacks every module of today's (here an empty one, and no `backends`)."""
    (tmp_path / "diffattn").mkdir()
    (tmp_path / "diffattn" / "__init__.py").write_text("")
    (tmp_path / "backends").mkdir()
    (tmp_path / "backends" / "__init__.py").write_text("")
    # an editable install's finder would supply today's modules the old tree lacks: drop it
    code = (f"import sys; sys.path[:0] = [{str(tmp_path)!r}, {str(ROOT)!r}]\n"
            + "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in str(getattr(f, '__module__', ''))]\n"
            + "import pkgutil, benchmarks\n"
            + "".join(f"import benchmarks.{m}\n" for m in MODULES)
            + "print(sorted(name for _, name, ispkg in pkgutil.iter_modules(benchmarks.__path__) if ispkg))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", "a subpackage under benchmarks/ is imported by asv's discovery"


def _benchmark_methods():
    sys.path.insert(0, str(ROOT))
    for m in MODULES:
        mod = importlib.import_module(f"benchmarks.{m}")
        for cname, cls in vars(mod).items():
            if isinstance(cls, type) and not cname.startswith("_") and cls.__module__ == mod.__name__:
                for attr in dir(cls):
                    if attr.startswith(("time_", "peakmem_", "track_")):
                        yield m, cls, attr, getattr(cls, attr)


def test_every_track_states_a_direction_the_report_knows():
    from diffattn.report import HIGHER_IS_BETTER_UNITS, LOWER_IS_BETTER_UNITS

    tracks = [(m, c.__name__, a, getattr(f, "unit", None)) for m, c, a, f in _benchmark_methods()
              if a.startswith("track_")]
    assert len(tracks) >= 10
    for m, c, a, unit in tracks:
        assert unit in HIGHER_IS_BETTER_UNITS | LOWER_IS_BETTER_UNITS, f"{m}.{c}.{a}: unit {unit!r}"
    higher = {a for _, _, a, u in tracks if u in HIGHER_IS_BETTER_UNITS}
    assert {"track_tflops_forward", "track_tokens_per_second", "track_mfu"} <= higher


def test_params_are_literals_and_benchmarks_have_versions():
    for m, cls, attr, _ in _benchmark_methods():
        assert isinstance(cls.params, (tuple, list)) and all(isinstance(p, list) for p in cls.params), cls
        assert all(isinstance(v, str) for p in cls.params for v in p), cls
        assert len(cls.param_names) == len(cls.params)
        assert getattr(cls, "version", None), f"{m}.{cls.__name__} sets no version"


def test_attention_flops_follow_the_flashattention_convention():
    sys.path.insert(0, str(ROOT))
    from benchmarks import _common as C

    B, L, d_model, H = 2, 128, 256, 4  # vanilla: 4 heads of 64
    d = d_model // H
    van = C.attention_layout("vanilla", d_model, H)
    assert C.attention_forward_flops(van, B, L) == 4 * B * L * L * H * d / 2
    # DIFF V1 twin: H/2 DIFF heads, each two q/k maps of d over one v of 2d: 6 N^2 d per DIFF
    # head, causal (shared/notes/kernels.md), i.e. 1.5x vanilla's work
    diff = C.attention_layout("diff", d_model, H)
    assert (diff.n_heads, diff.head_dim, diff.v_head_dim) == (H // 2, d, 2 * d)
    assert C.attention_forward_flops(diff, B, L) == B * (H // 2) * 6 * L * L * d
    # DIFF V2: H output heads, 2H query maps of d over v of d: twice vanilla's maps
    v2 = C.attention_layout("diff_v2", d_model, H)
    assert C.attention_forward_flops(v2, B, L) == 2 * C.attention_forward_flops(van, B, L)
    assert C.attention_forward_flops(van, B, L, causal=False) == 2 * C.attention_forward_flops(van, B, L)


def test_train_flops_per_token_halves_nanogpts_attention_term_for_causal():
    from diffattn import flops
    from diffattn.config import preset

    cfg = preset("tiny", attention="vanilla")
    T = 64
    n = cfg.num_params()
    nanogpt_attention = 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * T  # 12 L H Q T, non-causal
    assert flops.train_flops_per_token(cfg, T, causal=False) == 6 * n + nanogpt_attention
    assert flops.train_flops_per_token(cfg, T) == 6 * n + nanogpt_attention / 2
    # an untied input embedding is a lookup: 6 N leaves it out, the LM head stays
    untied = preset("tiny", attention="vanilla", tie_embeddings=False)
    assert flops.matmul_params(untied) == untied.num_params() - untied.vocab_size * untied.d_model == n


@pytest.mark.skipif(_gpu_visible(), reason="checks the skip on a machine without a GPU")
def test_gpu_only_combinations_skip_with_a_reason():
    sys.path.insert(0, str(ROOT))
    from benchmarks import _common as C

    for backend in C.BACKENDS:
        with pytest.raises(NotImplementedError, match="needs a GPU"):
            C.Runtime(backend, need_gpu=True)


def test_gpu_sampler_means_what_nvml_reports_over_the_block(monkeypatch):
    """GpuSampler against a stand-in NVML: mean clock and power, the share of samples held by the
    power cap, and the energy counter's difference over the `with` block; {} without NVML."""
    import sys
    import types

    from benchmarks import _common

    clock = iter([1800, 1900] * 1000)
    energy = iter([10_000, 25_000])  # mJ at entry and exit
    nvml = types.SimpleNamespace(
        nvmlInit=lambda: None, nvmlDeviceGetHandleByIndex=lambda i: "gpu0", NVML_CLOCK_SM=1,
        nvmlDeviceGetCurrentClocksEventReasons=lambda h: 4 if next(flags) else 0, nvmlClocksEventReasonSwPowerCap=4,
        nvmlDeviceGetClockInfo=lambda h, kind: next(clock), nvmlDeviceGetPowerUsage=lambda h: 500_000,
        nvmlDeviceGetTotalEnergyConsumption=lambda h: next(energy))
    flags = iter([True, False] * 1000)
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    with _common.GpuSampler(period=0.001) as gpu:
        while len(gpu.samples) < 10:
            pass
    n = len(gpu.samples)
    got = gpu.summary()
    assert got["joules"] == 15.0 and got["watts"] == 500.0
    assert got["sm_mhz"] == (1850 if n % 2 == 0 else (1850 * (n - 1) + 1800) / n)
    assert got["power_capped"] == (0.5 if n % 2 == 0 else (n // 2 + 1) / n)
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails: no samples
    with _common.GpuSampler() as gpu:
        pass
    assert gpu.summary() == {}


def test_gpu_clocks_names_the_reasons_nvml_holds_the_clock_for(monkeypatch):
    """gpu_clocks against a stand-in NVML of the older ("throttle") names: the SM clock and every
    reason bit set, by name; {} without NVML."""
    import sys
    import types

    from benchmarks import _common

    nvml = types.SimpleNamespace(
        nvmlInit=lambda: None, nvmlDeviceGetHandleByIndex=lambda i: "gpu0", NVML_CLOCK_SM=1,
        nvmlDeviceGetCurrentClocksThrottleReasons=lambda h: 4 | 32, nvmlClocksThrottleReasonSwPowerCap=4,
        nvmlClocksThrottleReasonSwThermalSlowdown=32, nvmlClocksThrottleReasonGpuIdle=1,
        nvmlClocksThrottleReasonAll=0xFF, nvmlDeviceGetClockInfo=lambda h, kind: 1850)
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    assert _common.gpu_clocks() == {"sm_mhz": 1850, "held_by": ["SwPowerCap", "SwThermalSlowdown"]}
    monkeypatch.setitem(sys.modules, "pynvml", None)
    assert _common.gpu_clocks() == {}
