"""`dalign serve`: the Best-of-N guard as an OpenAI-compatible server (see README, "Serving the guard")."""

from dalign.serve.app import Guard, create_app
from dalign.serve.server import build_guard, run_server

__all__ = ["Guard", "build_guard", "create_app", "run_server"]
