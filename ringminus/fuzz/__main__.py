"""``python -m ringminus.fuzz CAMPAIGN …`` — the same as ``ringminus fuzz``."""
import sys

from .runner import main

sys.exit(main(sys.argv[1:]))
