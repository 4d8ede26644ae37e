"""``python -m featurestore``: the same command line as the ``featurestore`` console script."""
import sys

from featurestore.cli import main

sys.exit(main())
