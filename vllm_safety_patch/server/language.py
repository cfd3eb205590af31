"""Which language a prompt is in: py3langid restricted to the project's languages.

Used by the server's refusal metrics (``metrics.py``) to label each request. The client may
name the language itself (header ``X-Prompt-Language``); a code the project does not know
becomes ``unknown``, never an error. So does a prompt that is not confidently one language:
source code (``def fibonacci(n):`` scored Italian, ``console.log('hi');`` French), a lone
"Ciao": on a coder model such prompts would otherwise skew the per-language refusal rates.
"""

from __future__ import annotations

import threading
from typing import Any

from vllm_safety_patch.languages import LANGUAGE_NAMES

LANGUAGE_HEADER = "X-Prompt-Language"
UNKNOWN = "unknown"
# A prompt is identified from its first characters: enough for any language here, and it
# bounds the cost (py3langid walks every byte).
MAX_CHARS = 1000
# Below this probability (py3langid's, normalised over the project's languages) the label is
# ``unknown``: code scores 0.27-0.59, sentences in the project's languages 0.7-1.0.
MIN_CONFIDENCE = 0.6

_identifier: Any = None
_lock = threading.Lock()


def _get_identifier() -> Any:
    """One py3langid identifier restricted to the project's languages (loaded once)."""
    global _identifier
    if _identifier is None:
        with _lock:
            if _identifier is None:
                from py3langid.langid import MODEL_FILE, LanguageIdentifier

                identifier = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
                known = set(identifier.nb_classes)
                identifier.set_languages([code for code in LANGUAGE_NAMES if code in known])
                _identifier = identifier
    return _identifier


def identify(text: str | None) -> str:
    """The ISO 639-1 code of ``text`` among ``LANGUAGE_NAMES``, or ``unknown`` if it is empty
    or not confidently one of them (code, a word or two)."""
    if not text or not text.strip():
        return UNKNOWN
    try:
        code, probability = _get_identifier().classify(text[:MAX_CHARS])
    except Exception:  # a metrics label must never fail a request
        return UNKNOWN
    if probability < MIN_CONFIDENCE:
        return UNKNOWN
    return code if code in LANGUAGE_NAMES else UNKNOWN


def client_language(value: str | None) -> str | None:
    """The label for a client's ``X-Prompt-Language`` value: None if absent (identify the
    prompt instead), the code if the project knows it, else ``unknown``."""
    if value is None:
        return None
    code = value.strip().lower().replace("_", "-").split("-")[0]
    return code if code in LANGUAGE_NAMES else UNKNOWN


def warm_up() -> None:
    """Load the model now (about a second) rather than on the first request."""
    identify("warm up")
