"""``python -m featurestore.extract``: exactly ``featurestore extract`` (same parser, same exit codes)."""
import sys

from featurestore.extract.run import main

sys.exit(main())
