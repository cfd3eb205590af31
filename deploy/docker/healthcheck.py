"""Container health check: exit 0 when the server's /health answers 200 (stdlib only, since
the slim image has no curl)."""

import os
import sys
import urllib.request

port = os.environ.get("VSP_PORT", "8000")
try:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=4) as reply:
        sys.exit(0 if reply.status == 200 else 1)
except OSError as error:
    print(f"unhealthy: {error}", file=sys.stderr)
    sys.exit(1)
