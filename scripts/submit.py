"""Entry point for ``ray submit cluster.yaml scripts/submit.py -- CONFIG [twostage run options]``.

``ray submit`` copies this file to the head node and runs it there. It joins the running cluster
(``RAY_ADDRESS=auto`` unless set) and hands over to ``twostage run``. A relative CONFIG path is
looked up in the current directory first, then in the project directory synced to the head node.
"""

import os
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    if not argv or argv[0].startswith("-"):
        print("usage: submit.py CONFIG [--set a.b=v ...] [--store URI] [--json]", file=sys.stderr)
        return 2
    os.environ.setdefault("RAY_ADDRESS", "auto")
    from pipeline import cli  # installed on every node by cluster.yaml's setup_commands

    config = Path(argv[0])
    if not config.is_file():
        project = Path(cli.__file__).resolve().parent.parent
        if (project / config).is_file():
            config = project / config
    return cli.main(["run", str(config), *argv[1:]])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
