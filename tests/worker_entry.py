"""Test-only entry point: ``radnode worker`` with a test chain, chosen by argument.

``radnode worker`` always runs the real chain; end-to-end tests start this file instead::

    python tests/worker_entry.py --config worker.yaml --scratch DIR --queues cpu --chain tests/pipeline_support.py:results_chain

It runs the very function the command runs, :func:`radnode.cli.worker_cmd.run_worker`.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--scratch", type=Path, required=True)
    parser.add_argument("--queues", default="cpu")
    parser.add_argument("--ae-title", default="RADWORKER")
    parser.add_argument("--chain", default=None)
    args = parser.parse_args()

    import radnode.cli.main  # noqa: F401 - what `radnode worker` has imported before it runs
    from radnode.cli.worker_cmd import parse_queues, run_worker
    from radnode.config import load_settings
    from radnode.config.logs import configure_logging

    settings = load_settings(args.config)
    configure_logging(settings.logging)
    run_worker(settings, args.scratch, parse_queues(args.queues), ae_title=args.ae_title, chain=args.chain)


if __name__ == "__main__":
    main()
