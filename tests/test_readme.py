"""The README's two set-up commands are the ones CI and users run."""
import re
from pathlib import Path


def commands():
    return re.findall(r"```bash\n(pip install [^\n]+)\n```", Path("README.md").read_text())


def test_readme_has_exactly_two_setup_commands():
    cmds = commands()
    assert len(cmds) == 2
    assert cmds[0].endswith("diffattn train --backend torch")  # the fastest backend on a CPU machine
    assert "pytest" in cmds[1]


def test_ci_runs_the_readmes_test_command():
    ci = Path(".ci/run").read_text().splitlines()
    assert commands()[1] in ci
