"""diffattn imports with neither MLX nor PyTorch; asking for a missing backend is one line."""
import subprocess
import sys

BLOCK = "import sys; sys.modules['torch'] = None; sys.modules['mlx'] = None; sys.modules['mlx.core'] = None; "


def run(code):
    return subprocess.run([sys.executable, "-c", BLOCK + code], capture_output=True, text=True)


def test_import_without_frameworks():
    r = run("import diffattn, diffattn.spec, diffattn.params, diffattn.backend, diffattn.conformance; print('ok')")
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_missing_backend_names_the_extra():
    for name, extra in (("mlx", "diffattn[mlx]"), ("cuda", "diffattn[cuda]")):
        r = run(f"from diffattn.backend import load; load({name!r})")
        assert r.returncode != 0
        last = r.stderr.strip().splitlines()[-1]
        assert "BackendError" in last and extra in last


def test_conformance_reports_missing_backend_in_one_line():
    r = run("from diffattn.conformance import main; raise SystemExit(main(['tests/fixtures/reference_diffattn.safetensors', '--backend', 'mlx']))")
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "pip install 'diffattn[mlx]'" in r.stderr
