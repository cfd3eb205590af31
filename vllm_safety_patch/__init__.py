"""vllm-safety-patch: sparse closed-form safety edits for multilingual LLM serving."""

__version__ = "0.1.0"
