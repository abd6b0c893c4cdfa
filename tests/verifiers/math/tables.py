"""What the math verifier tests share: a boxed completion, and a table checker."""

from __future__ import annotations

from grpo.verifiers.base import check_scores


def boxed(answer: str) -> str:
    return f"Working it out step by step.\n\nSo the answer is $\\boxed{{{answer}}}$."


def run(v, table):
    """table: (gold, completion, expected reward, expected reason or None), scored as one batch.
    Returns the scores; every row that differs is listed in the failure."""
    scores = v.score([c for _, c, _, _ in table], [{"answer": g} for g, _, _, _ in table])
    check_scores("math", scores, len(table))
    bad = [
        (g, c[-80:], want, why, s.reward, s.info)
        for (g, c, want, why), s in zip(table, scores)
        if s.reward != want or (why is not None and s.info["reason"] != why)
    ]
    assert not bad, "\n".join(map(repr, bad))
    return scores
