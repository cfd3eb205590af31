"""vLLM integration. Only this sub-package (and server/) imports vLLM internals."""


def register() -> None:
    """vLLM general-plugin entry point: zero-argument and idempotent (runs in every process)."""
    from vllm_safety_patch.vllm_plugin.loader import register_loader
    from vllm_safety_patch.vllm_plugin.worker_extension import register_worker_extension

    register_loader()
    register_worker_extension()
