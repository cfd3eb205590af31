"""``python -m vllm_safety_patch.cli``: the ``vsp`` command without its console script."""

import sys

from vllm_safety_patch.cli.root import main

sys.exit(main())
