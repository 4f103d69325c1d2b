"""The ``kvtier`` command's entry point. It imports the CLI (torch and the rest: a second or two) where a Ctrl-C
meanwhile ends the command as one later does (``kvtier: interrupted``, exit 130) rather than with a traceback
from inside torch's import."""

from __future__ import annotations

import sys


def main() -> int:
    try:
        from cluster.cli import main as run_command
    except KeyboardInterrupt:
        print("kvtier: interrupted", file=sys.stderr)
        return 130
    return run_command()
