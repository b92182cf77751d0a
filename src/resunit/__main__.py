"""``python -m resunit`` (and ``torchrun -m resunit``) run the CLI."""

import sys

from resunit.cli import main

sys.exit(main())
