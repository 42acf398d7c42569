"""The SDK imports (and its CLI loads) with torch, numpy, PIL, fmlora and server made unimportable."""

from __future__ import annotations

import subprocess
import sys
import textwrap

BLOCKED = ("torch", "torchvision", "timm", "numpy", "PIL", "fmlora", "server")


def test_client_imports_without_torch_numpy_or_the_library(tmp_path):
    code = textwrap.dedent(
        f"""
        import importlib.abc, sys

        BLOCKED = {BLOCKED!r}

        class Blocker(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in BLOCKED:
                    raise ImportError(f"blocked import of {{name}}")
                return None

        sys.meta_path.insert(0, Blocker())
        for name in list(sys.modules):
            if name.split(".")[0] in BLOCKED:
                del sys.modules[name]

        try:
            import torch  # noqa: F401
        except ImportError:
            pass
        else:
            raise SystemExit("the blocker does not work")

        import httpx
        import fmlora_client
        from fmlora_client import AsyncClient, Client
        from fmlora_client import cli

        def handler(request):
            return httpx.Response(200, json={{"model_version": 1, "snapshot_sha256": None,
                                              "results": [{{"predictions": [{{"label": "a", "score": 1.0}}]}}]}})

        with Client("http://x.test", transport=httpx.MockTransport(handler)) as client:
            assert client.predict(b"\\x89PNG").labels == ["a"]
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
        print("loaded:", loaded)
        """
    )
    # Run from a neutral directory so the repository's own packages are not importable by path.
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "loaded: []"
