"""Languages the project knows, by ISO 639-1 code."""

from __future__ import annotations

import difflib

from vllm_safety_patch.errors import DataError

LANGUAGE_NAMES: dict[str, str] = {
    "en": "English",
    "zh": "Chinese",
    "it": "Italian",
    "vi": "Vietnamese",
    "ar": "Arabic",
    "ko": "Korean",
    "th": "Thai",
    "bn": "Bengali",
    "sw": "Swahili",
    "jv": "Javanese",
    "ja": "Japanese",
    "de": "German",
    "es": "Spanish",
    "fr": "French",
    "nl": "Dutch",
    "pl": "Polish",
    "ru": "Russian",
    "yo": "Yoruba",
    "te": "Telugu",
}

# The nine non-English MultiJail languages: the ones shipped deltas must cover.
MULTIJAIL_TARGETS: tuple[str, ...] = ("zh", "it", "vi", "ar", "ko", "th", "bn", "sw", "jv")


def check_language(code: str) -> str:
    """Return ``code`` if known, else raise a DataError that suggests the closest code."""
    if code in LANGUAGE_NAMES:
        return code
    close = difflib.get_close_matches(code, LANGUAGE_NAMES, n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    raise DataError(
        f"unknown language code '{code}'",
        f"{hint}use an ISO 639-1 code from: {', '.join(sorted(LANGUAGE_NAMES))}",
    )
