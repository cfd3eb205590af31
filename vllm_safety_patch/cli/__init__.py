"""The ``vsp`` command (typer + rich): thin wrappers that parse, call one function and print.

``app`` is the console script's entry point (``vllm_safety_patch.cli:app``); ``root.py``
builds it from one module per command group.
"""

from vllm_safety_patch.cli.root import app, main

__all__ = ["app", "main"]
