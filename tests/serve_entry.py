"""Test-only entry point: the node of ``radnode serve`` with a test chain, chosen by argument.

``radnode serve`` always runs the real chain and nothing in the environment can change
that. End-to-end tests that need a scripted or slowed chain start this file instead::

    python tests/serve_entry.py --config radnode.yaml --chain tests/pipeline_support.py:results_chain

It imports :mod:`radnode.cli.main` first (every module ``radnode serve`` imports) and then
runs the very function the command runs, :func:`radnode.cli.serve_cmd.run_node`.
``--modules-out FILE`` writes the names in ``sys.modules`` of this (the node's) process
to FILE when it exits, for the test that the listener never imports the models.
"""

from __future__ import annotations

import argparse
import atexit
import json
import sys
from pathlib import Path


def _dump_modules(path: Path) -> None:
    path.write_text(json.dumps(sorted(sys.modules)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--chain", default=None, help="'module:function' or '/file.py:function'")
    parser.add_argument("--modules-out", type=Path, default=None)
    parser.add_argument("--roles", default=None, help="as `radnode serve --roles` (default: all)")
    args = parser.parse_args()
    if args.modules_out is not None:
        atexit.register(_dump_modules, args.modules_out)

    import radnode.cli.main  # noqa: F401 - what `radnode serve` has imported before it runs
    from radnode.cli.serve_cmd import run_node
    from radnode.config import load_settings
    from radnode.config.logs import configure_logging
    from radnode.service.roles import ALL_ROLES, parse_roles

    settings = load_settings(args.config)
    configure_logging(settings.logging)
    roles = ALL_ROLES if args.roles is None else parse_roles(args.roles)
    run_node(settings, lambda: load_settings(args.config), chain=args.chain, roles=roles)


if __name__ == "__main__":
    main()
