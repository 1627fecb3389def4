"""``python -m model SOURCE [options]``: the command line (``model/cli.py``; ``--help`` for the options)."""
import sys

from .cli import EXIT_INTERRUPTED, main

if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # while loading the model, before main() handles it
        sys.exit(EXIT_INTERRUPTED)
