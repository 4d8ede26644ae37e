"""``python -m featurestore.extract``: exactly ``featurestore extract`` (same parser, same exit codes)."""
import sys

from featurestore.cli import extract_main

sys.exit(extract_main())
