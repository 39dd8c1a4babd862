"""``python -m kl_lib.audit``: see :mod:`kl_lib.audit.cli`."""

import sys

from kl_lib.audit.cli import main

sys.exit(main())
