"""Which language a request is in, for the server's refusal metrics (``metrics.py``).

The client may name the language itself (header ``X-Prompt-Language``); a code the project
does not know becomes ``unknown``, never an error. Otherwise the prompt is identified by the
project's one language identifier (``judge/language.py``: py3langid restricted to the
project's languages, ``unknown`` for code or a word or two, which on a coder model would
otherwise skew the per-language refusal rates).
"""

from __future__ import annotations

from vllm_safety_patch.judge.language import UNKNOWN, identify, warm_up
from vllm_safety_patch.languages import LANGUAGE_NAMES

__all__ = ["LANGUAGE_HEADER", "UNKNOWN", "client_language", "identify", "warm_up"]

LANGUAGE_HEADER = "X-Prompt-Language"


def client_language(value: str | None) -> str | None:
    """The label for a client's ``X-Prompt-Language`` value: None if absent (identify the
    prompt instead), the code if the project knows it, else ``unknown``."""
    if value is None:
        return None
    code = value.strip().lower().replace("_", "-").split("-")[0]
    return code if code in LANGUAGE_NAMES else UNKNOWN
