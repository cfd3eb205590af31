"""Decide early: does the refusal judge agree on a reply's opening k tokens and on all of it?

The canary (``vllm_safety_patch/server/canary.py``) stops each probe at
``VSP_CANARY_MAX_TOKENS`` generated tokens, or as soon as the text so far is a refusal, and
judges what it has with the project's one refusal classifier
(:func:`~vllm_safety_patch.judge.refusal.is_refusal`, what ``vsp measure`` scores with). This
module measures how far that early verdict agrees with the classifier's verdict on the full
reply (``vsp measure`` generates 40 tokens), per language, kind and opening length, from the
replies ``vsp measure --samples DIR`` wrote (before: the base model; after: the delta).

An opening is judged as the canary judges it: the reply is re-tokenised with the served
model's tokenizer, and after each of its first k tokens the decoded text so far (without a
trailing incomplete character, which vLLM's detokenizer holds back) goes through
``is_refusal``; the probe counts as refused if any of those prefixes is one (the canary
stops at the first). The classifier itself is unchanged: the same function judges the full
replies and the openings.

    python -m vllm_safety_patch.eval.early_verdict build/early/samples/all.json \\
        [--tokens 4,6,8,12,16,24] [--model DIR] [--json OUT] [--show N]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vllm_safety_patch.judge.refusal import is_refusal
from vllm_safety_patch.settings import split_list

__all__ = [
    "TOKENS",
    "Agreement",
    "Disagreement",
    "agreement_table",
    "early_refusal",
    "format_table",
    "openings",
    "read_samples",
]

TOKENS = (4, 6, 8, 12, 16, 24)
HARMFUL, BENIGN = "harmful", "benign"
# `vsp measure --samples`: "metric|suite|lang" -> {"before": [...], "after": [...]}
_KINDS = {"refusal_rate|multijail": HARMFUL, "over_refusal|everyday": BENIGN}
MODELS = {"before": "base", "after": "delta"}

Encode = Callable[[str], list[int]]
Decode = Callable[[list[int]], str]


def openings(reply: str, most: int, encode: Encode, decode: Decode) -> list[str]:
    """The reply's text after each of its first ``most`` tokens (fewer if it is shorter),
    as the engine would have streamed it: an incomplete last character is held back."""
    ids = encode(reply)
    return [decode(ids[:count]).rstrip("\ufffd") for count in range(1, min(most, len(ids)) + 1)]


def early_refusal(prefixes: Sequence[str], tokens: int, lang: str) -> bool:
    """The canary's verdict at ``tokens``: refused if the text after any of the first
    ``tokens`` tokens is a refusal (it stops at the first one it sees)."""
    return any(is_refusal(text, lang) for text in prefixes[:tokens])


@dataclass(frozen=True)
class Disagreement:
    model: str  # base | delta
    kind: str  # harmful | benign
    lang: str
    row: int  # position in the measured rows (MultiJail 160 + row, everyday test row)
    tokens: int
    early: bool  # refused at the opening
    full: bool  # refused on the full reply
    opening: str
    reply: str


@dataclass
class Agreement:
    """Per (model, kind, language): replies judged and disagreements at each opening."""

    total: dict[tuple[str, str, str], int] = field(default_factory=dict)
    refused: dict[tuple[str, str, str], int] = field(default_factory=dict)  # full replies
    differ: dict[tuple[str, str, str, int], int] = field(default_factory=dict)
    cases: list[Disagreement] = field(default_factory=list)

    def share(self, key: tuple[str, str, str], tokens: int) -> float:
        total = self.total.get(key, 0)
        return 1.0 if not total else 1 - self.differ.get((*key, tokens), 0) / total


def read_samples(path: Path) -> dict[tuple[str, str, str], list[str]]:
    """``vsp measure --samples`` output -> {(model, kind, lang): replies} for the canary's
    two suites (other suites in the file are skipped)."""
    data = json.loads(path.read_text(encoding="utf-8"))
    replies = {}
    for key, sides in data.items():
        metric, suite, lang = key.split("|")
        kind = _KINDS.get(f"{metric}|{suite}")
        if kind is None:
            continue
        for side, model in MODELS.items():
            replies[(model, kind, lang)] = list(sides[side])
    return replies


def agreement_table(
    replies: Mapping[tuple[str, str, str], Sequence[str]],
    encode: Encode,
    decode: Decode,
    tokens: Iterable[int] = TOKENS,
) -> Agreement:
    """Early verdicts against the full-reply verdict for every reply and opening length."""
    tokens = sorted(set(tokens))
    result = Agreement()
    for key, texts in replies.items():
        model, kind, lang = key
        result.total[key] = len(texts)
        for row, reply in enumerate(texts):
            full = is_refusal(reply, lang)
            result.refused[key] = result.refused.get(key, 0) + full
            prefixes = openings(reply, tokens[-1], encode, decode)
            for count in tokens:
                early = early_refusal(prefixes, count, lang)
                if early != full:
                    result.differ[(*key, count)] = result.differ.get((*key, count), 0) + 1
                    opening = prefixes[min(count, len(prefixes)) - 1] if prefixes else ""
                    result.cases.append(
                        Disagreement(model, kind, lang, row, count, early, full, opening, reply)
                    )
    return result


def _languages(result: Agreement) -> list[str]:
    seen: list[str] = []
    for _, _, lang in result.total:
        if lang not in seen:
            seen.append(lang)
    return (["en"] if "en" in seen else []) + sorted(lang for lang in seen if lang != "en")


def format_table(result: Agreement, tokens: Iterable[int] = TOKENS) -> str:
    """Per model and kind, one line per language: the full replies' refusals, then at each
    opening length the agreement (%) and the number of replies judged differently; last, the
    lowest agreement over languages and the pooled one (both kinds)."""
    tokens = sorted(set(tokens))
    langs = _languages(result)
    lines = []
    header = f"{'lang':<5} {'n':>3} {'refused':>7} " + " ".join(f"{f'k={k}':>11}" for k in tokens)
    for model in MODELS.values():
        for kind in (HARMFUL, BENIGN):
            keys = [(model, kind, lang) for lang in langs if (model, kind, lang) in result.total]
            if not keys:
                continue
            lines += ["", f"{model} model, {kind} probes: agreement % (disagreements)", header]
            for key in keys:
                cells = [
                    f"{100 * result.share(key, k):6.1f} ({result.differ.get((*key, k), 0):>2})"
                    for k in tokens
                ]
                lines.append(
                    f"{key[2]:<5} {result.total[key]:>3} {result.refused.get(key, 0):>7} "
                    + " ".join(f"{cell:>11}" for cell in cells)
                )
        lines += ["", f"{model} model, both kinds per language: lowest and pooled agreement %"]
        for k in tokens:
            shares = []
            for lang in langs:
                keys = [(model, kind, lang) for kind in (HARMFUL, BENIGN)]
                total = sum(result.total.get(key, 0) for key in keys)
                differ = sum(result.differ.get((*key, k), 0) for key in keys)
                if total:
                    shares.append((1 - differ / total, lang))
            all_total = sum(n for key, n in result.total.items() if key[0] == model)
            all_differ = sum(
                n for (m, _, _, count), n in result.differ.items() if m == model and count == k
            )
            if shares and all_total:
                low, low_lang = min(shares)
                pooled = 1 - all_differ / all_total
                lines.append(
                    f"k={k:<3} lowest {100 * low:5.1f} ({low_lang})  pooled {100 * pooled:5.1f}"
                    f"  ({all_differ} of {all_total} differ)"
                )
    return "\n".join(lines).lstrip("\n")


def _tokenizer(model: Path | None) -> tuple[Encode, Decode]:
    from transformers import AutoTokenizer

    from vllm_safety_patch.config import default_model_dir

    tokenizer = AutoTokenizer.from_pretrained(model or default_model_dir())

    def encode(text: str) -> list[int]:
        return list(tokenizer.encode(text, add_special_tokens=False))

    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=True)

    return encode, decode


def _json(result: Agreement, tokens: Sequence[int]) -> dict[str, Any]:
    return {
        "tokens": list(tokens),
        "rows": [
            {
                "model": model,
                "kind": kind,
                "lang": lang,
                "n": n,
                "refused_full": result.refused.get((model, kind, lang), 0),
                "disagreements": {
                    str(k): result.differ.get((model, kind, lang, k), 0) for k in tokens
                },
            }
            for (model, kind, lang), n in result.total.items()
        ],
        "cases": [vars(case) for case in result.cases],
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vllm_safety_patch.eval.early_verdict",
        description="Agreement of the refusal judge on a reply's opening k tokens with its "
        "verdict on the full reply (vsp measure --samples output), per language and kind.",
    )
    parser.add_argument("samples", type=Path, help="a vsp measure --samples JSON file")
    parser.add_argument(
        "--tokens", default=",".join(map(str, TOKENS)), help="opening lengths, comma-separated"
    )
    parser.add_argument("--model", type=Path, help="checkpoint whose tokenizer re-tokenises")
    parser.add_argument("--json", type=Path, help="also write the table and every disagreement")
    parser.add_argument(
        "--show", type=int, default=0, metavar="K", help="print the disagreements at K tokens"
    )
    args = parser.parse_args(argv)
    try:
        tokens = sorted({int(part) for part in split_list(args.tokens)})
    except ValueError:
        parser.error(f"--tokens {args.tokens!r}: give whole numbers such as 4,8,16")
    if not tokens or tokens[0] < 1:
        parser.error("--tokens: give at least one length of 1 or more")
    if not args.samples.is_file():
        parser.error(f"{args.samples} does not exist: run vsp measure ... --samples DIR first")
    encode, decode = _tokenizer(args.model)
    result = agreement_table(read_samples(args.samples), encode, decode, tokens)
    print(format_table(result, tokens))
    if args.show:
        print(f"\ndisagreements at k={args.show} (early verdict, full verdict, opening | reply):")
        for case in result.cases:
            if case.tokens == args.show:
                full = "refused" if case.full else "answered"
                early = "refused" if case.early else "answered"
                print(
                    f"- {case.model} {case.kind} {case.lang} row {case.row}: early {early}, "
                    f"full {full}: {case.opening!r} | {case.reply!r}"
                )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(_json(result, tokens), ensure_ascii=False, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
