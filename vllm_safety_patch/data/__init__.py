"""Bundled development prompts: MultiJail and PolyRefuse (harmful, harmless) and MGSM.

The data files live in ``files/`` inside this package, each source with its licence;
``files/README.md`` describes them and their held-out remainder.
"""

from vllm_safety_patch.data.loaders import (
    SUITES,
    Prompt,
    SuiteInfo,
    data_digest,
    load_pairs,
    load_prompts,
    suite_languages,
)

__all__ = [
    "SUITES",
    "Prompt",
    "SuiteInfo",
    "data_digest",
    "load_pairs",
    "load_prompts",
    "suite_languages",
]
