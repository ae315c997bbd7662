"""``python -m fedllm.cli``: the ``fedllm`` command."""

import sys

from fedllm.cli.main import main

sys.exit(main())
