"""`python -m evaluation ...` = `alignserve eval ...`. The guard matters: vLLM spawns processes."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
