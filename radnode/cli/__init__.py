"""The ``radnode`` command line.

Each sub-command lives in its own module with a ``register(app)`` function, so a
feature brings its command with it and ``radnode --help`` only lists commands that
work. Heavy imports (torch, pynetdicom) happen inside the command bodies, which keeps
``radnode --help`` and ``radnode config`` fast.
"""

from __future__ import annotations

from radnode.cli.main import app

__all__ = ["app"]
