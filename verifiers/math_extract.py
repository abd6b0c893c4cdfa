"""Finding the final answer in a completion: pure string work, no sympy, runs in the caller.

Everything here is cheap (regexes and one linear scan), so the trainer's process does it for the
whole batch before anything is sent to the worker pool; the pool only sees the short answer spans.
That keeps the IPC payload small and lets identical (gold, answer) pairs be merged before any
parsing happens.

Extraction policy, in the order given by ``MathVerifier(extraction=...)``:

- ``boxed``: the ``\\boxed{...}`` / ``\\fbox{...}`` contents after the last ``</think>``. Identical
  boxes collapse to one; several *different* boxes are all kept, the final box last. What happens
  to them is the verifier's ``multiple_boxed`` setting: by default only the final box is graded
  (a revised answer), unless the gold answer itself has several parts (``\\boxed{1}, \\boxed{2}``
  for "find all roots"); ``reject`` gives 0 to several different boxes against a single gold.
- ``anchor``: the text after the last "final answer is" / "answer:" / "the answer is" phrase.
- ``last_number``: the last number in the text (off by default: it rewards any trailing digit).
- ``whole``: the whole (post-``</think>``) text is the answer span, for tasks whose completions
  are bare answers (off by default for the same reason as ``last_number``).

A boxed or anchored answer written in number words ("The answer is twenty-one.", ``\\boxed{three}``)
is read as its digits by :func:`read_number_words`; see there for what counts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction

EXTRACTORS = ("boxed", "anchor", "last_number", "whole")
DEFAULT_EXTRACTION = ("boxed", "anchor")

_BOX_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")
_THINK_CLOSE = "</think>"


@dataclass(frozen=True)
class Extraction:
    """The answer span(s) found in a text.

    ``parts`` are the distinct answer spans (one for the usual single box); ``source`` says which
    rule found them; ``reason`` is set when nothing usable was found ("no_answer", "empty_box").
    """

    parts: tuple[str, ...]
    source: str | None
    reason: str | None = None

    @property
    def text(self) -> str | None:
        """The answer as one string (several boxes joined as a list), or None."""
        return ", ".join(self.parts) if self.parts else None


def find_boxes(text: str) -> list[tuple[int, int, str]]:
    """All ``\\boxed{...}`` with balanced braces: (start, end, content). Unclosed boxes run to the end.

    Regexes cannot match nested braces (``\\boxed{\\frac{1}{2}}``), hence the scan.
    """
    out = []
    pos = 0
    while True:
        m = _BOX_RE.search(text, pos)
        if not m:
            return out
        depth, i = 1, m.end()
        while i < len(text) and depth:
            c = text[i]
            if c == "\\":  # skip escaped characters such as \{ and \}
                i += 2
                continue
            if c == "{":
                depth += 1
            elif c == "}":
                depth -= 1
            i += 1
        end = i if depth == 0 else len(text)
        content = text[m.end(): end - 1 if depth == 0 else end]
        out.append((m.start(), end, content))
        pos = end


def strip_thinking(text: str) -> str:
    """The part after the last ``</think>``: answers drafted while thinking are not the answer."""
    k = text.rfind(_THINK_CLOSE)
    return text[k + len(_THINK_CLOSE):] if k >= 0 else text


def _canon(s: str) -> str:
    """Whitespace- and wrapper-insensitive key used to decide whether two boxes say the same thing."""
    s = re.sub(r"\s+|\\[,;:! ]|\$", "", s)
    return s


def boxed_answer(text: str, final_last: bool = False) -> Extraction | None:
    """The distinct non-empty boxes of ``text``, in order of first appearance.

    ``final_last``: move the content of the final non-empty box to the end, so that ``parts[-1]``
    is the answer the completion ended with even when it repeats an earlier box
    (``\\boxed{4} ... \\boxed{3} ... \\boxed{4}`` gives ``("3", "4")``).
    """
    boxes = find_boxes(text)
    if not boxes:
        return None
    parts: list[str] = []
    seen: dict[str, str] = {}
    final = None
    for _, _, content in boxes:
        key = _canon(content)
        if not key:
            continue
        if key not in seen:
            # A "$" inside a box is a stray delimiter ("\boxed{12 $ and $13}"), never part of the math.
            seen[key] = re.sub(r"(?<!\\)\$", " ", content).strip()
            parts.append(seen[key])
        final = seen[key]
    if not parts:
        return Extraction((), "boxed", "empty_box")
    if final_last and parts[-1] != final:
        parts.remove(final)
        parts.append(final)
    return Extraction(tuple(parts), "boxed")


# "The final answer is X. I hope it is correct." (Minerva/MATH few-shot format), "Final Answer: X",
# "the answer is X", "Answer: X". The span runs to the end of the line; trailing politeness is cut.
_ANCHOR_RE = re.compile(
    r"(?i)(?:final\s+answer(?:\s+is)?|the\s+answer\s+is|\banswer\s*:)\s*[:：]?\s*"
)
_ANCHOR_TAIL_RE = re.compile(r"(?i)\s*(?:\.?\s*I hope it is correct.*|\.\s*$)", re.S)


def anchor_answer(text: str) -> Extraction | None:
    last = None
    for m in _ANCHOR_RE.finditer(text):
        rest = text[m.end():]
        line = rest.split("\n", 1)[0].strip() if rest.strip() else ""
        if not line:
            # "**Final Answer**\n\n$x$": the answer is on the next non-empty line
            lines = [ln.strip() for ln in rest.split("\n") if ln.strip()]
            line = lines[0] if lines else ""
        line = line.strip("* ")
        if line:
            last = line
    if last is None:
        return None
    span = _ANCHOR_TAIL_RE.sub("", last).strip()
    if not span:
        return None
    return Extraction((span,), "anchor")


_LAST_NUMBER_RE = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def last_number_answer(text: str) -> Extraction | None:
    nums = _LAST_NUMBER_RE.findall(text)
    if not nums:
        return None
    return Extraction((nums[-1].rstrip(","),), "last_number")


def extract(text: str, policy: tuple[str, ...] = DEFAULT_EXTRACTION) -> Extraction:
    """Apply the extraction rules in order; the first that finds something wins."""
    if not isinstance(text, str):
        return Extraction((), None, "no_answer")
    body = strip_thinking(text)
    for rule in policy:
        if rule == "boxed":
            got = boxed_answer(body, final_last=True)
        elif rule == "anchor":
            got = anchor_answer(body)
        elif rule == "last_number":
            got = last_number_answer(body)
        elif rule == "whole":
            got = Extraction((body.strip(),), "whole") if body.strip() else None
        else:  # validated in the constructor; kept so a typo can never pass silently
            raise ValueError(f"unknown extraction rule {rule!r}")
        if got is not None:
            return got
    return Extraction((), None, "no_answer")


def gold_answer(gold) -> Extraction:
    """The gold answer span(s). A gold may be a number, a bare answer, or a full worked solution.

    Several different boxes in a gold are a multi-part answer (``\\boxed{1} and \\boxed{2}``).
    """
    if isinstance(gold, bool) or gold is None:
        return Extraction((), None, "bad_gold")
    if isinstance(gold, (int, Fraction)):
        return Extraction((str(gold),), "gold")
    if isinstance(gold, float):
        if gold != gold or gold in (float("inf"), float("-inf")):
            return Extraction((), None, "bad_gold")
        return Extraction((repr(gold),), "gold")
    if not isinstance(gold, str) or not gold.strip():
        return Extraction((), None, "bad_gold")
    boxed = boxed_answer(gold)
    if boxed is not None and boxed.parts:
        return Extraction(boxed.parts, "gold_boxed")
    anchored = anchor_answer(gold) if "final answer" in gold.lower() else None
    if anchored is not None:
        return Extraction(anchored.parts, "gold")
    return Extraction((gold.strip(),), "gold")


# Plain numbers the caller can compare exactly without sympy: 85, -3, 0.25, 1,234,567.5, +033.
# Anything else (fractions, percent, LaTeX, decimal commas such as 1,22) goes to the pool.
_PLAIN_NUMBER_RE = re.compile(r"[+-]?(?:\d+|[1-9]\d{0,2}(?:,\d{3})+)(?:\.\d+)?")
_PLAIN_WRAPPERS_RE = re.compile(r"^\s*(?:\$+|\\\(|\\\[)?\s*(.*?)\s*(?:\$+|\\\)|\\\])?\s*$", re.S)

# math-verify compares a float to anything after rounding both to this many decimals; numbers with
# at most this many decimals round to themselves, so exact comparison gives the same verdict.
FAST_PATH_MAX_DECIMALS = 6


def plain_number(s: str) -> Fraction | None:
    """The exact value of a plain decimal number string, else None (meaning: ask the pool)."""
    if not isinstance(s, str) or len(s) > 40:
        return None
    m = _PLAIN_WRAPPERS_RE.match(s)
    core = m.group(1) if m else s
    if not _PLAIN_NUMBER_RE.fullmatch(core):
        return None
    if "." in core and len(core.split(".", 1)[1]) > FAST_PATH_MAX_DECIMALS:
        return None
    return Fraction(core.replace(",", ""))


# -- number words ------------------------------------------------------------------------------
#
# "The answer is three." / \boxed{twenty-one}: an explicit answer written as an English cardinal.
# Only boxed and anchored spans (and the gold) are read this way, never free text, and the words
# must be the whole span, optionally followed by one word such as a unit ("three apples" is read
# as "3 apples" and then judged exactly as "3 apples" would be). Cardinals only: fractions ("a
# half", "three quarters") and ordinals ("third") are not numbers here, so they stay words.

_ONES = {
    "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9,
    "ten": 10, "eleven": 11, "twelve": 12, "thirteen": 13, "fourteen": 14, "fifteen": 15,
    "sixteen": 16, "seventeen": 17, "eighteen": 18, "nineteen": 19,
}
_TENS = {"twenty": 20, "thirty": 30, "forty": 40, "fifty": 50, "sixty": 60, "seventy": 70, "eighty": 80, "ninety": 90}
_SCALES = {"thousand": 10**3, "million": 10**6, "billion": 10**9}
_SIGNS = {"negative": -1, "minus": -1}
# Every word that can be part of a cardinal; also used by the hedge rules ("at least three").
NUMBER_WORDS = frozenset(["zero", "hundred", "and", *_ONES, *_TENS, *_SCALES])
_NUMBER_WORD_WRAPPER_RE = re.compile(r"\\(?:text|textbf|textit|textrm|mathrm|mbox|textnormal)\s*\{([^{}]*)\}")
_NUMBER_WORD_SPAN_RE = re.compile(r"[A-Za-z]+(?:[\s-]+[A-Za-z]+)*")
# "three quarters", "two thirds", "five sixths": a fraction, not a cardinal followed by a unit.
_FRACTION_WORD_RE = re.compile(
    r"halves|half|quarters?|thirds?"
    r"|[a-z]*(?:four|fif|six|seven|eigh|nin|ten|elev|twelf|teen|tie|hundred|thousand|illion)ths?"
)


def _below_hundred(words: list[str], i: int) -> tuple[int, int] | None:
    """1..99 at words[i:]: "seven", "fifteen", "forty", "forty two" (hyphens are already spaces)."""
    if i >= len(words):
        return None
    w = words[i]
    if w in _TENS:
        if i + 1 < len(words) and _ONES.get(words[i + 1], 10) < 10:
            return _TENS[w] + _ONES[words[i + 1]], i + 2
        return _TENS[w], i + 1
    if w in _ONES:
        return _ONES[w], i + 1
    return None


def _tail(words: list[str], i: int, part) -> tuple[int, int] | None:
    """``part`` at words[i:], after an optional "and" ("one hundred and five"); a dangling "and" is not taken."""
    j = i + 1 if i < len(words) and words[i] == "and" else i
    return part(words, j)


def _group(words: list[str], i: int) -> tuple[int, int] | None:
    """A number below 10,000 at words[i:]: "forty-two", "a hundred", "three hundred and five", "twelve hundred"."""
    if i + 1 < len(words) and words[i] == "a" and (words[i + 1] == "hundred" or words[i + 1] in _SCALES):
        value, j = 1, i + 1  # "a hundred", "a thousand"
    else:
        got = _below_hundred(words, i)
        if got is None:
            return None
        value, j = got
    if j < len(words) and words[j] == "hundred":
        value, j = value * 100, j + 1
        rest = _tail(words, j, _below_hundred)
        if rest is not None:
            value, j = value + rest[0], rest[1]
    return value, j


def _cardinal(words: list[str]) -> tuple[int, int] | None:
    """(value, words used) of the cardinal at the start of ``words``, else None.

    Scales must decrease ("two million three hundred thousand and five"); "three four" reads as 3
    with "four" left over (the caller then refuses the span).
    """
    if words[:1] == ["zero"]:
        return 0, 1
    got = _group(words, 0)
    if got is None:
        return None
    total, last_scale = 0, None
    while True:
        value, j = got
        scale = _SCALES.get(words[j]) if j < len(words) else None
        if scale is None or (last_scale is not None and scale >= last_scale):
            return total + value, j
        total, last_scale = total + value * scale, scale
        got = _tail(words, j + 1, _group)
        if got is None:
            return total, j + 1


def read_number_words(span: str) -> str | None:
    """The span with its number words as digits ("twenty-one" -> "21", "three apples" -> "3 apples"), else None.

    None unless the whole span (after ``\\text{}`` wrappers, ``$``, ``**`` and trailing punctuation)
    is a cardinal, with an optional sign word ("negative five") and at most one trailing word
    that is neither a number word nor a fraction word. So "three", "one hundred and five" and
    "three apples" are read, while "three or four", "one of them", "one-to-one" and "three
    quarters" are not.
    """
    if not isinstance(span, str) or len(span) > 200:
        return None
    s = _NUMBER_WORD_WRAPPER_RE.sub(r" \1 ", span)
    s = re.sub(r"\\[,;:! ]|~|\$|\*\*", " ", s)
    s = re.sub(r"[\s.,;:!]+$", "", s).strip()
    if not _NUMBER_WORD_SPAN_RE.fullmatch(s):
        return None
    words = re.split(r"[\s-]+", s.lower())
    sign = 1
    if words[0] in _SIGNS and len(words) > 1:
        sign, words = _SIGNS[words[0]], words[1:]
    got = _cardinal(words)
    if got is None:
        return None
    value, used = got
    rest = words[used:]
    if len(rest) > 1 or (rest and (rest[0] in NUMBER_WORDS or rest[0] in _SIGNS or rest[0] == "a"
                                   or _FRACTION_WORD_RE.fullmatch(rest[0]))):
        return None
    digits = str(sign * value)
    return f"{digits} {rest[0]}" if rest else digits
