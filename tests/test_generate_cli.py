"""`diffattn generate`: a checkpoint written by one backend continues a prompt on another, the
same tokens as on the backend that wrote it (greedy, and sampled from one seed)."""
import importlib.util
import subprocess
import sys

import pytest

from diffattn import data, harness
from diffattn.backend import load
from diffattn.cli import main
from diffattn.config import TrainConfig, preset
from diffattn.generate import Sampler, generate, load_run

HAVE = [b for b, m in (("cuda", "torch"), ("mlx", "mlx")) if importlib.util.find_spec(m)]
pairs = pytest.mark.skipif(len(HAVE) < 2, reason="needs both torch and mlx")


def train_tiny(backend, out):
    cfg = preset("tiny", attention="diff", n_kv_heads=1)
    tcfg = TrainConfig(batch_size=2, seq_len=16, steps=2, warmup_steps=0, eval_every=2, eval_batches=1)
    harness.train(cfg, tcfg, data.load("builtin:pydoc"), load(backend, device="cpu"), out, progress=False)
    return out


def cli_tokens(capsys, run, backend, *extra):
    assert main(["generate", str(run), "--prompt", "The ", "--max-new-tokens", "10", "--backend", backend,
                 "--device", "cpu", "--tokens", *extra]) == 0
    return [int(t) for t in capsys.readouterr().out.split()]


@pairs
@pytest.mark.parametrize("writer,reader", [("mlx", "cuda"), ("cuda", "mlx")])
def test_generate_from_the_other_backends_checkpoint(tmp_path, capsys, writer, reader):
    run = train_tiny(writer, tmp_path / "run")
    model, tok, _ = load_run(run, writer, device="cpu")
    prompt = tok.encode("The ")[None]
    for extra, sampler in (([ "--temperature", "0"], Sampler(0)),
                           (["--temperature", "1", "--top-k", "20", "--seed", "5"], Sampler(1.0, top_k=20, seed=5))):
        want = generate(model, prompt, 10, sampler)[0].tolist()
        assert cli_tokens(capsys, run, reader, *extra) == want, extra


def test_generate_streams_text_and_bad_input_is_one_line(tmp_path):
    backend = HAVE[0] if HAVE else "numpy"
    run = train_tiny(backend, tmp_path / "run")
    cmd = [sys.executable, "-m", "diffattn.cli", "generate", str(run), "--backend", "numpy"]
    ok = subprocess.run(cmd + ["--prompt", "The ", "--max-new-tokens", "8", "--seed", "1"],
                        capture_output=True, text=True)
    assert ok.returncode == 0 and ok.stdout.startswith("The ") and len(ok.stdout.encode()) >= 4 + 1, ok.stderr
    for args, needle in ((["--prompt", "x", "--top-p", "2"], "top_p"),
                         (["--prompt", ""], "empty"),
                         (["--prompt", "x" * 70], "context")):
        bad = subprocess.run(cmd + args, capture_output=True, text=True)
        assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and needle in bad.stderr, bad.stderr
    missing = subprocess.run([sys.executable, "-m", "diffattn.cli", "generate", str(tmp_path / "nope"),
                              "--prompt", "x"], capture_output=True, text=True)
    assert missing.returncode == 2 and "no checkpoint" in missing.stderr
