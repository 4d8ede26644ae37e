"""``python -m heads``: the same as the ``heads`` console script."""
import sys

from heads.cli import main

sys.exit(main())
