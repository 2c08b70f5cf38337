"""`python -m ddp.bench`: ddp-bench without its console script."""
import sys

from .cli import main

sys.exit(main())
