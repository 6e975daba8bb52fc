"""Mutation check of the run-folder guards: disable each guard, run the tests, expect a failure.

    python tests/mutate_guards.py [PYTEST ARGS]   (from the repository root)

For every guard below, a `sitecustomize.py` that replaces the guard's function with a disabled
one is put first on PYTHONPATH, so the mutation applies in pytest and in every process the
tests start (the SIGKILLed children, the CLI subprocesses). The tests run with -x; a guard
passes the check when some test fails with it disabled. The unmutated tests run first and must
pass. Default tests: tests/test_faults.py and tests/test_harness.py on the numpy backend (the
guards are the same code on every backend). Prints a markdown table; exits 1 if a mutant
survives or the unmutated run fails.
"""
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_ARGS = ["tests/test_faults.py", "tests/test_harness.py", "-k", "not cuda and not mlx"]

# guard -> (what the mutant does, the code that disables it)
MUTANTS = {
    "resume truncation of metrics.jsonl": (
        "truncate_metrics keeps every line", """
import diffattn.runfolder as m
def truncate_metrics(path, start_step):
    path.touch()
m.truncate_metrics = truncate_metrics
"""),
    "NaN-parameter check at checkpoint time": (
        "_finite_state always True", """
import diffattn.harness as m
m._finite_state = lambda params: True
"""),
    "manifest files check": (
        "check_manifest_files checks nothing", """
import diffattn.runfolder as m
m.check_manifest_files = lambda ckpt, manifest, verify=True: None
"""),
    "run folder lock": (
        "lock creates the folder, takes no flock", """
import diffattn.runfolder as m
from pathlib import Path
def lock(out_dir):
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return m.RunLock(None, out / m.LOCK_NAME)
m.lock = lock
"""),
}


def pytest_run(args, sitecustomize=None) -> tuple[int, str, float]:
    """(exit code, first failing test or '', seconds) of `pytest -x -q args`, mutated if given."""
    with tempfile.TemporaryDirectory() as site:
        path = [str(ROOT)]
        if sitecustomize is not None:
            Path(site, "sitecustomize.py").write_text(sitecustomize)
            path.insert(0, site)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(path + [os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
        t0 = time.time()
        r = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *args], cwd=ROOT,
                           env=env, capture_output=True, text=True)
    failed = next((line.split(" ", 1)[1].split(" - ")[0] for line in r.stdout.splitlines()
                   if line.startswith(("FAILED ", "ERROR "))), "")
    return r.returncode, failed, time.time() - t0


def main(argv=None) -> int:
    args = list(argv if argv is not None else sys.argv[1:]) or DEFAULT_ARGS
    ok = True
    rc, failed, secs = pytest_run(args)
    print(f"unmutated: pytest {' '.join(map(repr, args))} -> {'pass' if rc == 0 else 'FAIL ' + failed} ({secs:.0f} s)\n")
    ok &= rc == 0
    print("| guard | disabled by | result | first failing test |")
    print("| --- | --- | --- | --- |")
    for guard, (how, code) in MUTANTS.items():
        rc, failed, secs = pytest_run(args, code)
        caught = rc != 0 and bool(failed)
        ok &= caught
        print(f"| {guard} | {how} | {'caught' if caught else 'SURVIVED'} ({secs:.0f} s) | {failed or '-'} |")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
