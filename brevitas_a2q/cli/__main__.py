"""``python -m brevitas_a2q.cli``: the ``a2q`` command."""

import sys

from brevitas_a2q.cli import main

sys.exit(main())
