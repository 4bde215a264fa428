"""`ufcpu serve`: TEI- and OpenAI-compatible HTTP serving (needs the `server` extra: starlette, uvicorn)."""
from __future__ import annotations

from .app import Settings, build_app, run

__all__ = ["Settings", "build_app", "run", "serve"]


def serve(args) -> int:
    """The command line's `serve`: parsed arguments -> exit code."""
    fields = Settings.__dataclass_fields__
    return run(Settings(**{k: v for k, v in vars(args).items() if k in fields}))
