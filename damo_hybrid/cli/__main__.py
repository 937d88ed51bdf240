"""``python -m damo_hybrid.cli``: the ``damo-hybrid`` command."""

import sys

from . import main

sys.exit(main())
