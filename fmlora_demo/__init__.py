"""``fmlora demo``: a client of the HTTP API that shows the system learning task after task.

It talks to a server only through ``fmlora_client`` (starting ``fmlora serve`` as a child process
when no URL is given) and uses ``fmlora`` for the offline glyph benchmark's data; it never imports
the server.
"""

from fmlora_demo.demo import DemoResult, register, run_demo

__all__ = ["DemoResult", "register", "run_demo"]
