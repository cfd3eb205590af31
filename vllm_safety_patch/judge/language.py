"""Which language a text is in: py3langid restricted to the project's languages.

Two users, one identifier: the server labels each request's language for its refusal metrics
(``server/language.py``), and the evaluation asks whether a benign request was answered in
its own language (an edit that maps a language's activations towards English can make the
model answer a Thai request in English: a cost the refusal judge does not see).
A text that is not confidently one language is ``unknown``: source code (``def
fibonacci(n):`` scored Italian, ``console.log('hi');`` French), a lone "Ciao".
"""

from __future__ import annotations

import re
import threading
from typing import Any

from vllm_safety_patch.languages import LANGUAGE_NAMES

__all__ = ["UNKNOWN", "answered_in_other_language", "identify", "warm_up"]

UNKNOWN = "unknown"
# A text is identified from its first characters: enough for any language here, and it
# bounds the cost (py3langid walks every byte).
MAX_CHARS = 1000
# Below this probability (py3langid's, normalised over the project's languages) the label is
# ``unknown``: code scores 0.27-0.59, sentences in the project's languages 0.7-1.0.
MIN_CONFIDENCE = 0.6
# Code in a reply says nothing about the language it is written in.
_CODE = re.compile(r"```.*?(?:```|$)|`[^`\n]*`", re.DOTALL)

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


def answered_in_other_language(reply: str, lang: str) -> bool:
    """Whether ``reply`` (its prose, code left out) is confidently in a project language other
    than the request's ``lang``: "Dear [房东的姓名], I hope this message finds you well" to a
    Chinese request. A reply too short or mixed to tell counts as answered in ``lang``."""
    found = identify(_CODE.sub(" ", reply))
    return found not in (UNKNOWN, lang)


def warm_up() -> None:
    """Load the model now (about a second) rather than on the first request."""
    identify("warm up")
