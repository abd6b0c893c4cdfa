"""Finding the final answer in a completion: pure string work, no sympy, runs in the caller.

Everything here is cheap (regexes and one linear scan), so the trainer's process does it for the
whole batch before anything is sent to the worker pool; the pool only sees the short answer spans.
That keeps the IPC payload small and lets identical (gold, answer) pairs be merged before any
parsing happens.

Extraction policy, in the order given by ``MathVerifier(extraction=...)``:

- ``boxed``: the ``\\boxed{...}`` / ``\\fbox{...}`` contents after the last ``</think>``. Identical
  boxes collapse to one; several *different* boxes are all kept and flagged, so the comparison can
  accept them only when the gold answer itself has that many parts (``\\boxed{1}, \\boxed{2}`` for
  "find all roots") and give 0 otherwise (anti-gaming: boxing several candidates).
- ``anchor``: the text after the last "final answer is" / "answer:" / "the answer is" phrase.
- ``last_number``: the last number in the text (off by default: it rewards any trailing digit).
- ``whole``: the whole (post-``</think>``) text is the answer span, for tasks whose completions
  are bare answers (off by default for the same reason as ``last_number``).
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


def boxed_answer(text: str) -> Extraction | None:
    boxes = find_boxes(text)
    if not boxes:
        return None
    parts: list[str] = []
    seen = set()
    for _, _, content in boxes:
        key = _canon(content)
        if not key:
            continue
        if key not in seen:
            seen.add(key)
            # A "$" inside a box is a stray delimiter ("\boxed{12 $ and $13}"), never part of the math.
            parts.append(re.sub(r"(?<!\\)\$", " ", content).strip())
    if not parts:
        return Extraction((), "boxed", "empty_box")
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
            got = boxed_answer(body)
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
