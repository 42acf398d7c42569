"""README's two commands are what CI runs."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _bash_blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


def test_ci_runs_the_readme_test_command_and_install():
    blocks = _bash_blocks()
    install, test = blocks[0].strip(), blocks[1].strip()
    ci = (ROOT / ".ci" / "run").read_text()
    assert test in ci.splitlines()
    assert "pip install -q -e '.[dev]' -e './clients[cli]'" in ci
    assert "-e '.[dev]' -e './clients[cli]'" in install
    assert install.endswith("fmlora demo")
