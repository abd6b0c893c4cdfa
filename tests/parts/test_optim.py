import pytest
import torch

from grpo.parts.config import ConfigError
from grpo.parts.optim import build_optimizer, build_scheduler


def rates(name, warmup, total, steps, **kw):
    p = torch.nn.Parameter(torch.zeros(1))
    opt = build_optimizer([p], lr=1.0, betas=[0.9, 0.99])
    sched = build_scheduler(opt, name, warmup, total, **kw)
    out = []
    for _ in range(steps):
        out.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    return out


def test_constant_with_warmup_trains_from_the_first_step():
    # warm-up 5: step s uses min(1, (s + 1) / 5), so the first step is at 1/5, not at 0.
    assert rates("constant_with_warmup", 5, 100, 7) == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0, 1.0, 1.0])


def test_cosine_with_min_lr_ends_at_the_floor():
    # warm-up 2 then cosine down to 0.1 of the peak over 10 steps. Step s uses the schedule at s + 1:
    # s = 0 -> 1/2 (warm-up); s = 1 -> progress (2-2)/(10-2) = 0 -> 1.0; s = 5 -> progress 4/8 ->
    # 0.1 + 0.9 * 0.5 * (1 + cos(pi/2)) = 0.55; the last step s = 9 -> progress 1 -> the floor 0.1.
    r = rates("cosine_with_min_lr", 2, 10, 10, min_lr_rate=0.1)
    assert r[0] == pytest.approx(0.5) and r[1] == pytest.approx(1.0)
    assert r[5] == pytest.approx(0.55) and r[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(r[1:], r[2:]))


def test_unknown_schedule_is_a_config_error():
    p = torch.nn.Parameter(torch.zeros(1))
    with pytest.raises(ConfigError, match="optim.schedule='wobbly'"):
        build_scheduler(build_optimizer([p], 1.0, [0.9, 0.99]), "wobbly", 0, 10)
