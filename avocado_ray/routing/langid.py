"""Classifiers that ask a language-identification library whether a prompt is Chinese.

Code, math and multimodal still come from the rules (a language identifier knows languages, not domains); only
the Chinese decision changes. Both libraries ship their models inside their wheels (nothing is downloaded) and
are installed with the `langid` extra; selected by `routing.classifier: cld2` or `lingua`. `avocado-ray bench
router` measures them beside the rules on the same prompts (docs/usage.md, "Routing").
"""

from __future__ import annotations

from avocado_ray.routing.classifier import RuleClassifier

CHINESE_CODES = ("zh", "zh-Hant")  # CLD2's codes for simplified and traditional Chinese


class Cld2Classifier(RuleClassifier):
    """Chinese when CLD2 (pycld2, Google's Compact Language Detector 2, C++) names Chinese as the prompt's
    main language."""

    def __init__(self) -> None:
        import pycld2

        self._detect = pycld2.detect
        self._error = pycld2.error

    def is_chinese(self, text: str, ascii_text: bytes, utf8: bytes) -> bool:
        try:
            _, _, languages = self._detect(text)
        except self._error:  # CLD2 refuses some control characters: ask again without them
            _, _, languages = self._detect("".join(c for c in text if c.isprintable() or c in "\n\t"))
        return languages[0][1] in CHINESE_CODES


class LinguaClassifier(RuleClassifier):
    """Chinese when Lingua (lingua-language-detector, Rust; low-accuracy mode, its n-gram models for all 75
    languages) detects Chinese as the prompt's language."""

    def __init__(self) -> None:
        from lingua import Language, LanguageDetectorBuilder

        self._detector = LanguageDetectorBuilder.from_all_languages().with_low_accuracy_mode().build()
        self._chinese = Language.CHINESE

    def is_chinese(self, text: str, ascii_text: bytes, utf8: bytes) -> bool:
        return self._detector.detect_language_of(text) == self._chinese
