"""Deciding whether an extracted answer equals the gold answer: the part that needs sympy.

This runs inside the worker processes of :mod:`grpo.verifiers.pool` (it can hang or blow up on inputs
such as ``5^{5^{5^{5^5}}}``, and only a process can be killed safely), and it is importable in the
caller for tests. math-verify's own SIGALRM timeouts are switched off (``parsing_timeout=None``,
``timeout_seconds=None``): signals only work in the main thread, and the pool bounds time anyway.

Verdict rules on top of math-verify's equivalence:

- A prediction is split into its alternatives (``3 or 4``, ``\\pm 3``, ``\\{3, 4\\}``, several
  different boxes). If the gold is a single value, several alternatives get 0 ("hedged" /
  "multiple_boxed") even when one of them is right. If the gold has several parts, the two must
  match as collections (math-verify's set/tuple comparison).
- Only the pair that math-verify parsed as sympy objects is compared; the fallback of comparing
  raw strings is used only when neither side parsed (plain-text answers such as "Evelyn").
"""

from __future__ import annotations

import logging
import re
from functools import lru_cache

# Imported lazily in the worker so that `import grpo.verifiers.math` in the trainer stays cheap.
_mv = None


def _math_verify():
    global _mv
    if _mv is None:
        # math-verify logs a warning per call when its own timeout is off; we bound time ourselves.
        logging.getLogger("math_verify").setLevel(logging.ERROR)
        import math_verify
        from math_verify import ExprExtractionConfig, LatexExtractionConfig

        _mv = (math_verify, LatexExtractionConfig(), ExprExtractionConfig())
    return _mv


# "x = 3 or x = 4", "3 \text{ and } 4": connectors between alternatives become list commas.
_CONNECTOR_RE = re.compile(
    r"\s*,?\s*(?:\\(?:text|textbf|mathrm|mbox)\s*\{\s*(?:,\s*)?(?:and|or)\s*\}|(?<![A-Za-z\\])(?:and|or)(?![a-z]))\s*"
)
_MATH_DELIMS_RE = re.compile(r"\$|\\\(|\\\[")
# Words outside LaTeX commands: a span with such prose is searched for its math, not parsed whole.
_WORD_RE = re.compile(r"(?<![\\A-Za-z])[A-Za-z]{3,}")
_LATEX_TEXT_RE = re.compile(r"\\(?:text|textbf|textit|mathrm|mbox|operatorname|textnormal)\s*\{[^{}]*\}")
_UNIT_WORDS = {
    "percent", "percentage", "pct", "units", "unit", "degrees", "degree", "cm", "meters", "miles",
    "inches", "feet", "hours", "minutes", "seconds", "dollars", "cents", "yuan", "km", "mph",
}
# 12,345 and 12{,}345 and 12,\!345 as thousands separators (comma then exactly three digits).
_THOUSANDS_RE = re.compile(r"(?<=\d)(?:\{,\}\s*|,\\!\s*|,|\\,|\s)(?=\d{3}(?!\d))")
_PLAIN_THOUSANDS_RE = re.compile(r"[+-]?[1-9]\d{0,2}(?:(?:\{,\}\s*|,\\!\s*|,|\\,|\s)\d{3})+(?:\.\d+)?")
# A bare number written as text (no LaTeX): "1 000", "1000,99" (decimal comma), "7,425,000".
# math-verify's number regexes read these the way people write them; a LaTeX parse would not.
_TEXT_NUMBER_RE = re.compile(r"[+-]?\d+(?:[.,]\d+)?")
_PERCENT_TAIL_RE = re.compile(
    r"^(?P<core>.*?)\s*(?:\\?%|\\text\s*\{\s*\\?%\s*\}|\\?(?:text\s*\{\s*)?(?:percent(?:age)?|pct)\s*\}?)\s*$",
    re.S,
)
_SCI_RE = re.compile(r"(?<![\w.])([+-]?\d+(?:\.\d+)?)[eE]([+-]?\d+)(?![\w.])")
_REPEATING_RE = re.compile(r"([+-]?)(\d*)\.(\d*)\\overline\s*\{(\d+)\}")
_WORD_ANSWER_RE = re.compile(r"[A-Za-z][A-Za-z ]*[A-Za-z]")
_DECIMAL_COMMA_RE = re.compile(r"[+-]?\d+,\d+")
_DOUBLE_ESCAPED_CMD_RE = re.compile(r"(?<!\\)\\\\(?=[A-Za-z]{2,})")


def _is_prose(span: str) -> bool:
    bare = _LATEX_TEXT_RE.sub(" ", span)
    bare = re.sub(r"\\(?:begin|end)\s*\{[^{}]*\}|\\[A-Za-z]+", " ", bare)
    words = [w for w in _WORD_RE.findall(bare) if w.lower() not in _UNIT_WORDS]
    return len(words) >= 2


def _clean(span: str) -> str:
    s = _DOUBLE_ESCAPED_CMD_RE.sub(r"\\", span)  # JSON-escaped twice: \\frac -> \frac
    s = s.replace("\\$", "")  # currency sign; the amount is the answer
    s = _SCI_RE.sub(r"\1\\times 10^{\2}", s)  # 1.5e3: plain-text scientific notation
    s = _REPEATING_RE.sub(_repeating_to_frac, s)
    s = s.strip()
    while True:  # trailing full stops and LaTeX line breaks are punctuation, not math
        t = re.sub(r"(?:\\\\|\.|,|;)\s*$", "", s).strip()
        if t == s:
            return s
        s = t


def _repeating_to_frac(m: re.Match) -> str:
    """0.1\\overline{6} -> \\frac{1}{6}: a repeating decimal is an exact rational."""
    from fractions import Fraction

    sign, whole, fixed, rep = m.groups()
    value = Fraction(int(whole or "0")) + Fraction(int(fixed or "0"), 10 ** len(fixed)) if fixed else Fraction(int(whole or "0"))
    value += Fraction(int(rep), (10 ** len(rep) - 1) * 10 ** len(fixed))
    if sign == "-":
        value = -value
    return f"\\frac{{{value.numerator}}}{{{value.denominator}}}"


def _strip_outer_math(span: str) -> tuple[str, bool]:
    """The span without one pair of enclosing math delimiters, and whether there was one."""
    s = _clean(span)
    for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if s.startswith(left) and s.endswith(right) and len(s) > len(left) + len(right):
            inner = s[len(left): -len(right)]
            if not _MATH_DELIMS_RE.search(inner):
                return _clean(inner), True
    return s, False


@lru_cache(maxsize=4096)
def parse_span(span: str, latex: bool = False) -> tuple:
    """math-verify's parse of one answer span (not a whole completion): a tuple of candidates.

    Bare LaTeX (``\\frac{1}{2}``) is parsed as math; a span mixing prose and math ("so the number
    is 10 which is 1,000.99m²") is searched with math-verify's extraction regexes, which prefer the
    last formula or number. ``latex`` says the span came from a box or a formula, where a comma
    separates list items (``\\boxed{-2,1}``); in plain text ``1000,99`` is a decimal comma, as
    math-verify reads it. A trailing percent sign is taken off and applied to the parsed value,
    because this latex2sympy build does not parse ``28\\%`` inside math.
    """
    mv, latex_cfg, expr_cfg = _math_verify()
    s, wrapped = _strip_outer_math(span)
    latex = latex or wrapped
    if not s:
        return ()
    kw = dict(parsing_timeout=None)
    m = _PERCENT_TAIL_RE.match(s)
    if m and m.group("core").strip() and not _is_prose(s):
        core = parse_span(m.group("core"), latex)
        if core and not isinstance(core[0], str):
            from latex2sympy2_extended.latex2sympy2 import convert_to_pct

            return (convert_to_pct(core[0]), s)
    if _MATH_DELIMS_RE.search(s) or _is_prose(s):
        return tuple(mv.parse(s, [latex_cfg, expr_cfg], **kw))
    if _PLAIN_THOUSANDS_RE.fullmatch(s):
        s = _THOUSANDS_RE.sub("", s)
    elif not latex and _TEXT_NUMBER_RE.fullmatch(s):
        got = mv.parse(s, [expr_cfg], **kw)
        if got:
            return tuple(got)
    s = _CONNECTOR_RE.sub(", ", s)
    got = mv.parse("\\boxed{" + s + "}", [latex_cfg], **kw)
    if not got:
        got = mv.parse(s, [latex_cfg, expr_cfg], **kw)
    return tuple(got)


def _expr(parsed: tuple):
    """The sympy object of a parse (first candidate), or None when only a string came back."""
    if parsed and not isinstance(parsed[0], str):
        return parsed[0]
    return None


def _alternatives(expr) -> list:
    """The separate answers a prediction offers: elements of a finite set, else itself."""
    from sympy import FiniteSet

    if isinstance(expr, FiniteSet):
        return list(expr.args)
    return [expr]


def _verify(gold, pred) -> bool:
    mv = _math_verify()[0]
    return bool(mv.verify(gold, pred, timeout_seconds=None))


def _finite(expr) -> bool:
    """False for nan/zoo results (``12:00`` reads as 12/0): those cannot be compared as numbers."""
    from sympy import nan, zoo

    try:
        return not (expr == zoo or expr == nan or expr.has(zoo, nan))
    except Exception:  # noqa: BLE001 - matrices and sets without .has behave like finite values
        return True


# Numbers above 2**MAX_BITS in magnitude are not evaluated: sympy would try to build them exactly
# (5^{5^{5^{5^5}}} has about 10^2184 digits) and never return. Ordinary answers are far below.
MAX_BITS = 2**20


def _bits(expr) -> float | None:
    """Roughly log2|value| of a purely numeric expression tree (an overestimate), None if not numeric."""
    import math

    from sympy import Add, Float, Integer, Mul, Pow, Rational

    def log2(x: int) -> float:
        return math.log2(abs(x)) if x else 0.0

    if isinstance(expr, Integer):
        return log2(int(expr))
    if isinstance(expr, Rational):
        return log2(int(expr.p)) - log2(int(expr.q))
    if isinstance(expr, Float):
        v = abs(float(expr))
        return float("inf") if v == float("inf") else (math.log2(v) if v else 0.0)
    if isinstance(expr, Pow):
        b, e = _bits(expr.base), _bits(expr.exp)
        if b is None or e is None:
            return None
        if e > 60:  # the exponent alone exceeds 2**60
            return float("inf") if b > 0 else 0.0
        return abs(b) * 2.0**e
    if isinstance(expr, Mul):
        parts = [_bits(a) for a in expr.args]
        return None if any(x is None for x in parts) else sum(max(x, 0.0) for x in parts)
    if isinstance(expr, Add):
        parts = [_bits(a) for a in expr.args]
        return None if any(x is None for x in parts) else max(parts) + math.log2(len(parts))
    return None


def _too_large(expr) -> bool:
    """True if some numeric subexpression (such as a power tower) is too large to evaluate."""
    from sympy import Basic, Pow

    if not isinstance(expr, Basic):
        return False
    try:
        for node in expr.atoms(Pow) | {expr}:
            b = _bits(node)
            if b is not None and b > MAX_BITS:
                return True
    except (ValueError, OverflowError, TypeError):
        return True
    return False


def judge(
    gold_parts: tuple[str, ...], pred_parts: tuple[str, ...], gold_latex: bool = False, pred_latex: bool = False
) -> tuple[bool, str, str | None]:
    """(correct, reason, parsed prediction as text). ``reason`` is "correct" when correct.

    ``*_latex``: the parts came from boxes (see :func:`parse_span`).
    """
    gold_span, pred_span = ", ".join(gold_parts), ", ".join(pred_parts)
    gw, pw = _word_answer(gold_span), _word_answer(pred_span)
    if gw is not None and pw is not None:
        # Plain-text answers ("Evelyn", "odd"): sympy would read them as products of one-letter
        # symbols, where "odd" == "dod"; compare the words instead.
        ok = gw == pw
        return ok, ("correct" if ok else "wrong"), pw
    golds = _readings(gold_span, gold_latex)
    if not golds:
        return False, "gold_unparsable", None
    preds = _readings(pred_span, pred_latex)
    if not preds:
        return False, "unparsable", None
    if len(golds) > 1 or len(preds) > 1:
        # "1,5" in plain text is 1.5 or the list 1, 5: either reading of either side may match.
        for gold in golds:
            for pred in preds:
                g, p = _expr(gold), _expr(pred)
                if g is not None and p is not None and _finite(g) and _finite(p) and not (
                    _too_large(g) or _too_large(p)
                ) and _verify(g, p):
                    return True, "correct", str(p)[:200]
    gold, pred = golds[0], preds[0]
    g, p = _expr(gold), _expr(pred)
    shown = str(p if p is not None else pred[0])[:200]
    if g is None or p is None or not (_finite(g) and _finite(p)):
        # Plain-text answers (and clock times): only exact agreement of the extracted text counts.
        ok = _canon_text(gold[-1]) == _canon_text(pred[-1]) != ""
        return ok, ("correct" if ok else "wrong"), shown
    if _too_large(g) or _too_large(p):
        # Structural equality is the only safe test left (same tower on both sides).
        ok = g == p
        return ok, ("correct" if ok else "too_large"), shown
    if _verify(g, p):
        return True, "correct", shown
    alts = _alternatives(p)
    if len(alts) > 1 and len(_alternatives(g)) == 1:
        # Several answers against a single gold: 0 even if one of them is right, but say so.
        if any(_verify(g, a) for a in alts):
            return False, ("multiple_boxed" if len(pred_parts) > 1 else "hedged"), shown
    return False, "wrong", shown


def _readings(span: str, latex: bool) -> list[tuple]:
    """The parses of a span: two for a plain-text "a,b" (decimal comma, then list), else one."""
    first = parse_span(span, latex)
    if not latex:
        core = _strip_outer_math(span)[0]
        if _DECIMAL_COMMA_RE.fullmatch(core) and not _PLAIN_THOUSANDS_RE.fullmatch(core):
            second = parse_span(core, True)
            return [r for r in (first, second) if r]
    return [first] if first else []


def _word_answer(span: str) -> str | None:
    """The lower-cased words of a purely verbal answer (``\\text{Evelyn}``, ``odd``), else None."""
    s = _LATEX_TEXT_INNER_RE.sub(r"\1", _strip_outer_math(span)[0]).strip()
    if not _WORD_ANSWER_RE.fullmatch(s) or len(s.replace(" ", "")) < 2:
        return None
    return re.sub(r"\s+", " ", s).lower()


def _canon_text(x) -> str:
    s = str(x)
    s = _LATEX_TEXT_INNER_RE.sub(r"\1", s)
    return re.sub(r"\s+", " ", s).strip().lower()


_LATEX_TEXT_INNER_RE = re.compile(r"\\(?:text|textbf|textit|mathrm|mbox|textnormal)\s*\{([^{}]*)\}")


def judge_payload(payload: tuple) -> tuple[bool, str, str | None]:
    """Pool entry point: ``payload`` is the argument tuple of :func:`judge`."""
    return judge(*payload)
