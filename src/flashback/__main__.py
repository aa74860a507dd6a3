"""`python -m flashback ...` (and `torchrun -m flashback train ...`): the same CLI as the `flashback` command."""

import sys

from flashback.cli import main

if __name__ == "__main__":
    sys.exit(main())
