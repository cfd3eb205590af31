"""Serving the safety patch: HTTP routes to list and hot-switch deltas on a live vLLM server.

``plugin.py`` is the ``vllm.endpoint_plugins`` entry point (routes, header middleware, state);
the engine side lives in ``vllm_plugin/worker_extension.py``. Nothing here imports vLLM at
module import time.
"""

# The admin token's header when Authorization carries vLLM's --api-key. Shared by the server
# and its clients (`vsp deltas ...`), here because importing this package costs nothing.
ADMIN_HEADER = "X-VSP-Admin-Token"
