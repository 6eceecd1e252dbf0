"""`python -m dgss ...` (also what `torchrun -m dgss train ...` runs)."""

import sys

from .cli import main

sys.exit(main())
