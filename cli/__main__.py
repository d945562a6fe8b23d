"""`python -m cli ...` = `alignserve ...`. The guard matters: vLLM spawns processes."""

import sys

from .main import main

if __name__ == "__main__":
    sys.exit(main())
