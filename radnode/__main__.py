"""``python -m radnode``: the same command line as the ``radnode`` script."""

from radnode.cli import app

if __name__ == "__main__":
    app()
