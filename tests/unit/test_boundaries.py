"""Import boundaries: the ML library stays free of the web stack; the client stays free of torch."""

import ast
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
WEB = {"fastapi", "starlette", "uvicorn", "httpx", "server"}
CLIENT_FORBIDDEN = {"torch", "fmlora", "server", "timm", "torchvision"}


def _imported_roots(package: Path) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = {node.module.split(".")[0]}
            else:
                continue
            found.setdefault(str(path.relative_to(ROOT)), set()).update(names)
    return found


def test_fmlora_sources_never_import_the_web_stack():
    offenders = {f: n & WEB for f, n in _imported_roots(ROOT / "fmlora").items() if n & WEB}
    assert offenders == {}


def test_importing_fmlora_loads_no_web_module():
    code = (
        "import sys, fmlora, fmlora.cli, fmlora.bench.runner, fmlora.training.pretrain;"
        f"print(sorted(m for m in {sorted(WEB)!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


def test_client_package_imports_neither_torch_nor_the_library():
    package = ROOT / "clients" / "fmlora_client"
    assert package.is_dir()
    offenders = {f: n & CLIENT_FORBIDDEN for f, n in _imported_roots(package).items() if n & CLIENT_FORBIDDEN}
    assert offenders == {}


def test_import_linter_contracts_hold():
    exe = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
    out = subprocess.run([exe], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Contracts: 5 kept, 0 broken" in out.stdout
