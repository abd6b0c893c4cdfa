"""Deciding whether an extracted answer equals the gold answer: the part that needs sympy.

This runs inside the worker processes of :mod:`grpo.verifiers.pool` (it can hang or blow up on inputs
such as ``5^{5^{5^{5^5}}}``, and only a process can be killed safely), and it is importable in the
caller for tests. math-verify's own SIGALRM timeouts are switched off (``parsing_timeout=None``,
``timeout_seconds=None``): signals only work in the main thread, and the pool bounds time anyway.

Verdict rules on top of math-verify's equivalence:

- Several different boxes (``multiple_boxed``): with "last" (the verifier's default) a single-valued
  gold is compared with the final box only, since a completion that revises its answer offers one
  answer; a multi-part gold is compared with all boxes as a set, then with the final box alone.
  With "reject" several boxes are compared as a set, which a single gold never equals.
- A prediction is split into its alternatives (``3 or 4``, ``\\pm 3``, ``\\{3, 4\\}``, several
  different boxes under "reject"). If the gold is a single value, several alternatives get 0
  ("hedged" / "multiple_boxed") even when one of them is right. If the gold has several parts, the
  two must match as collections (math-verify's set/tuple comparison).
- A hedge written in words gets 0 ("hedged") before anything is parsed: a range ("at least 1",
  "1 or more", "at most 3", "3 or fewer", "more than 2"), an estimate ("approximately 3", "about 3",
  ``\\approx 3``), an uncertain or parenthetical alternative ("1 (or 2)", "probably 4"). A phrase
  only counts when the gold does not say the same kind of thing: a gold "at least 1" is matched by
  "1 or more", both read without their phrases. See :data:`_HEDGE_PHRASES` for the choices.
- ``|z|`` of a complex number is evaluated exactly: ``i`` inside an absolute value with no other
  variable is the imaginary unit, so ``|3+4i|`` equals 5 (and not 7).
- Only the pair that math-verify parsed as sympy objects is compared; the fallback of comparing
  raw strings is used only when neither side parsed (plain-text answers such as "Evelyn").
"""

from __future__ import annotations

import logging
import re
from functools import lru_cache

from grpo.verifiers.math_extract import NUMBER_WORDS

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


# -- hedges written in words ------------------------------------------------------------------
#
# A span that qualifies its value instead of stating it: a range, an estimate or a guess. Each
# phrase has a kind (phrases of one kind mean the same thing, so a gold "at least 1" accepts
# "1 or more") and a place where it counts:
#   "value": anywhere, when a value follows ("at least 3", "x is less than \\frac{1}{2}"), so
#            "up to isomorphism" or "greater than or equal to" in prose do not count;
#   "lead":  only when nothing but wrappers or "x =" comes before it, and a value follows.
#            Estimates are hedges only as the whole answer ("approximately 3", "\\approx 3"): after
#            an exact value ("\\frac{\\sqrt{3}}{3} \\approx 0.577", "x \\approx 11") they only annotate
#            it, and the comparison reads the value as before. Leading relation symbols ("\\geq 3")
#            work the same way; with a left side ("x \\geq 3") they are an inequality answer.
#   "any":   anywhere ("1 or more", "1 (or 2)", "probably 4").
# Chosen: "approximately 3" is a hedge. The gold is exact, and an answer that declines to claim
# the exact value does not give it; a gold that is itself approximate ("\\approx 3.14") accepts it.
_HEDGE_PHRASES: dict[str, dict[str, tuple[str, ...]]] = {
    "at_least": {
        "value": ("at least", "no less than", "not less than", "no fewer than", "not fewer than",
                  "a minimum of", "at minimum", "greater than or equal to", "more than or equal to"),
        "any": ("or more", "or greater", "or higher", "or above", "or larger", "or over", "and up",
                "and above", "and more"),
        "lead": (r"\\ge(?:q|qslant)?", ">=", "≥"),
    },
    "at_most": {
        "value": ("at most", "no more than", "not more than", "no greater than", "not greater than",
                  "no larger than", "a maximum of", "at maximum", "up to", "less than or equal to"),
        "any": ("or less", "or fewer", "or lower", "or below", "or smaller", "or under", "and below",
                "and under"),
        "lead": (r"\\le(?:q|qslant)?", "<=", "≤"),
    },
    # (A bare "<" or ">" is not one: "<1, 2>" is a vector.)
    "more_than": {"value": ("more than", "greater than", "larger than", "bigger than"), "lead": (r"\\gt",)},
    "less_than": {"value": ("less than", "fewer than", "smaller than"), "lead": (r"\\lt",)},
    "approximately": {
        "lead": ("approximately", "approx.", "approx", "about", "around", "roughly", "nearly", "almost",
                 "circa", "close to", "more or less", "an estimated", "estimated", r"\\approx", "≈", r"\\sim"),
        "any": ("or so", "give or take"),
    },
    "unsure": {"any": ("maybe", "possibly", "perhaps", "probably", "likely", r"\(\s*or")},
}
# A value follows: a digit, sign, decimal point, LaTeX command, bracket or a number word, after
# spaces, closing \text{} braces or "$" ("\text{at least } 1", "at least $\frac{1}{2}$").
_VALUE_AHEAD = r"(?=[\s}$~]*(?:[-+−\d.\\({\[|]|(?:%s)(?![A-Za-z])))" % "|".join(sorted(NUMBER_WORDS - {"and"}))
_WRAPPER = r"\s|\$|~|\{|\\[(\[,;: ]|\\(?:text|textbf|textit|textrm|mathrm|mbox|textnormal)\s*\{"
# Before a "lead" phrase: only wrappers, and at most one "x =" ("x = about 3").
_LEAD_ONLY_RE = re.compile(rf"(?:{_WRAPPER})*(?:[A-Za-z](?:_\{{?\w+\}}?)?\s*=(?:{_WRAPPER})*)?")


def _phrase_re(phrase: str) -> str:
    """A phrase as a regex: words at word boundaries with any spacing. Phrases that start with a
    backslash are regexes already (a LaTeX command such as ``\\ge(?:q)?``, or ``\\(\\s*or`` for
    "(or"), and a command must not run into a longer name (``\\le`` is not ``\\left``)."""
    if phrase.startswith("\\"):
        return phrase + r"(?![A-Za-z])"
    body = r"\s+".join(re.escape(w) for w in phrase.split())
    before = r"(?<![A-Za-z])" if phrase[0].isalpha() else ""
    after = r"(?![A-Za-z])" if phrase[-1].isalpha() else ""
    return before + body + after


def _build_hedge_re() -> tuple[re.Pattern, list[tuple[str, str]]]:
    # One alternation, longest phrase first, so that at one position "more or less" wins over
    # "more than" and "no more than" is found before "more than" can be. Group n is phrase n.
    table = [(p, kind, where) for kind, places in _HEDGE_PHRASES.items() for where, ps in places.items() for p in ps]
    table.sort(key=lambda t: -len(t[0]))
    alts = [f"(?P<h{n}>{_phrase_re(p)}){'' if where == 'any' else _VALUE_AHEAD}"
            for n, (p, _, where) in enumerate(table)]
    return re.compile("|".join(alts), re.I), [(kind, where) for _, kind, where in table]


_HEDGE_RE, _HEDGE_KIND_OF = _build_hedge_re()


def _hedges(span: str) -> tuple[frozenset[str], str]:
    """The kinds of hedge phrases in ``span``, and the span without those phrases."""
    kinds, keep, pos = set(), [], 0
    for m in _HEDGE_RE.finditer(span):
        kind, where = _HEDGE_KIND_OF[int(m.lastgroup[1:])]
        if where == "lead" and not _LEAD_ONLY_RE.fullmatch(span[: m.start()]):
            continue  # "x \approx 11", "x \geq 3": an annotation or an inequality, not a hedge
        kinds.add(kind)
        keep.append(span[pos: m.start()])
        pos = m.end()
    keep.append(span[pos:])
    return frozenset(kinds), " ".join(keep).strip()


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
        return _moduli_evaluated(parsed[0])
    return None


def _moduli_evaluated(expr):
    """``|3+4i|`` -> 5: in an absolute value whose only variable is ``i``, ``i`` is the imaginary unit.

    latex2sympy reads ``i`` as a variable, so ``|3+4i|`` (also ``\\left|...\\right|``, ``\\lvert
    ...\\rvert``) stays ``Abs(4*i + 3)``, equal to no number. The modulus of an expression in ``i``
    alone is the modulus of a complex number; rebuilt with sympy's ``I`` it evaluates exactly.
    Outside an absolute value ``i`` keeps its meaning (an index, a variable), and a real modulus
    such as ``|-7|`` needs nothing: sympy evaluates it already.
    """
    from sympy import Abs, Basic, I

    if not isinstance(expr, Basic) or not expr.has(Abs) or _too_large(expr):
        return expr  # (rebuilding a power tower would evaluate it)

    def complex_modulus(e) -> bool:
        return isinstance(e, Abs) and [s.name for s in e.free_symbols] == ["i"]

    def evaluated(e):
        (i,) = e.free_symbols
        return Abs(e.args[0].subs(i, I))

    try:
        return expr.replace(complex_modulus, evaluated)
    except Exception:  # noqa: BLE001 - an odd tree keeps its unevaluated form; the comparison decides
        return expr


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


MULTIPLE_BOXED = ("last", "reject")


def judge(
    gold_parts: tuple[str, ...],
    pred_parts: tuple[str, ...],
    gold_latex: bool = False,
    pred_latex: bool = False,
    multiple_boxed: str = "reject",
    hedge_words: bool = False,
) -> tuple[bool, str, str | None, bool]:
    """(correct, reason, parsed prediction as text, whether only the final part was graded).

    ``reason`` is "correct" when correct. ``*_latex``: the parts came from boxes (see
    :func:`parse_span`). ``pred_parts`` are distinct boxes with the final box last;
    ``multiple_boxed`` ("last" or "reject") says what several of them mean. ``hedge_words``: look
    for hedges written in words (for short answer spans; a whole completion has prose).
    """
    if multiple_boxed not in MULTIPLE_BOXED:
        raise ValueError(f"multiple_boxed must be one of {MULTIPLE_BOXED}, got {multiple_boxed!r}")
    if multiple_boxed == "last" and len(pred_parts) > 1:
        if not _single_valued(gold_parts, gold_latex):
            # "Find all roots": separate boxes may be the parts of one answer; else the final box
            # may hold the whole list after a revision.
            ok, reason, shown = _judge(gold_parts, pred_parts, gold_latex, pred_latex, hedge_words)
            if ok:
                return ok, reason, shown, False
        return (*_judge(gold_parts, pred_parts[-1:], gold_latex, pred_latex, hedge_words), True)
    return (*_judge(gold_parts, pred_parts, gold_latex, pred_latex, hedge_words), False)


def _single_valued(gold_parts: tuple[str, ...], latex: bool) -> bool:
    """False for a gold with several parts: several boxes, or a parse with several alternatives."""
    if len(gold_parts) != 1:
        return False
    for reading in _readings(gold_parts[0], latex):
        expr = _expr(reading)
        if expr is not None and len(_alternatives(expr)) > 1:
            return False
    return True


def _judge(
    gold_parts: tuple[str, ...], pred_parts: tuple[str, ...], gold_latex: bool, pred_latex: bool, hedge_words: bool
) -> tuple[bool, str, str | None]:
    gold_span, pred_span = ", ".join(gold_parts), ", ".join(pred_parts)
    if hedge_words:
        pred_kinds, pred_bare = _hedges(pred_span)
        if pred_kinds:
            gold_kinds, gold_bare = _hedges(gold_span)
            if not pred_kinds <= gold_kinds:
                return False, "hedged", None
            if pred_kinds == gold_kinds:
                # The gold says the same kind of thing ("at least 1" vs "1 or more"): compare the rest.
                gold_span, pred_span = gold_bare, pred_bare
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


def judge_payload(payload: tuple) -> tuple[bool, str, str | None, bool]:
    """Pool entry point: ``payload`` is the argument tuple of :func:`judge`."""
    return judge(*payload)


def warm() -> None:
    """Run once by each pool worker at start (grpo/verifiers/pool.py): comparisons down the paths the
    math verifier's calls take (a plain gold answer against a boxed one, a boxed one that is no
    number, plain text) build the parsers math-verify and sympy make on first use."""
    judge(("1/2",), ("\\frac{1}{2}",), False, True, "last", True)
    judge(("12",), ("12c9",), False, True, "last", True)
    judge(("x^2 + 1",), ("1 + x^2",))
