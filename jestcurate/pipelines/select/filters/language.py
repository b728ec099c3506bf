"""Caption language, identified by lingua (the PyPI package lingua-language-detector, whose
models ship inside its wheel: nothing is downloaded at run time). A row stays when its
caption's detected language is one of the codes; a caption with no detectable language
(empty, digits, a file name) is removed. Accuracy on short captions: docs/benchmarks.md."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from jestcurate.errors import JCError
from jestcurate.io.eligible import Verdict

PACKAGE = "lingua-language-detector"


def _lingua() -> Any:
    try:
        import lingua
    except ImportError:
        raise JCError(
            f"--language needs the {PACKAGE} package (language models inside its wheel, "
            "~100 MB): pip install 'jestcurate[filters]'"
        ) from None
    return lingua


def parse_codes(given: tuple[str, ...]) -> tuple[str, ...]:
    """ISO 639-1 codes, lower case, sorted, each one lingua knows (else a one-line error)."""
    lingua = _lingua()
    codes = sorted({c.strip().lower() for c in given if c.strip()})
    if not codes:
        raise JCError("--language needs at least one ISO 639-1 code, such as en")
    for code in codes:
        try:
            lingua.IsoCode639_1.from_str(code)
        except ValueError:
            known = sorted(str(lang.iso_code_639_1.name).lower() for lang in lingua.Language.all())
            raise JCError(
                f"unknown language code {code!r} for --language: give ISO 639-1 codes that "
                f"lingua knows ({', '.join(known)})"
            ) from None
    return tuple(codes)


def detector_version() -> str:
    """What identifies the detector in a selection's identity (another release may differ)."""
    from importlib.metadata import version

    _lingua()
    return f"{PACKAGE} {version(PACKAGE)}, all languages, high accuracy"


@functools.lru_cache(maxsize=1)
def _detector() -> Any:
    """Every language lingua knows, in its high-accuracy mode: ~1 GB, built once."""
    lingua = _lingua()
    return lingua.LanguageDetectorBuilder.from_all_languages().build()


def detect(captions: list[str]) -> list[str | None]:
    """Each caption's ISO 639-1 code, None where lingua finds no language."""
    found = _detector().detect_languages_in_parallel_of(captions)
    return [None if lang is None else lang.iso_code_639_1.name.lower() for lang in found]


@dataclass(frozen=True)
class CaptionLanguage:
    """Removes rows whose caption is not in one of `codes`; why: the detected language's code
    (detail; null where lingua found none)."""

    codes: tuple[str, ...]
    name: str = "language"
    fate: str = "filtered"
    columns: tuple[str, ...] = ("caption",)

    def __call__(self, table: pa.Table, shard: str, candidate: np.ndarray) -> Verdict:
        removed = np.ones(len(candidate), dtype=bool)
        detail = np.full(len(candidate), None, dtype=object)
        rows = np.flatnonzero(candidate)
        captions = table.column("caption").take(pa.array(rows)).to_pylist()
        found = detect([c or "" for c in captions])
        wanted = set(self.codes)
        removed[rows] = [code not in wanted for code in found]
        detail[rows] = np.array(found, dtype=object)
        return Verdict(removed, None, detail)
