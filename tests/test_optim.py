"""The master's optimizers (``ef21.methods.optim``) against ``torch.optim``, ``clip_grad_norm_`` and
``torch.optim.lr_scheduler`` fed the same sequence of aggregates g: the same iterates to float tolerance, every
step. Also: SGD with momentum is EF21-HB step for step, the schedules' closed forms, and the flag checks."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from ef21.engine.config import RunConfig
from ef21.errors import UserError
from ef21.methods.optim import LrSchedule, make_optimizer

torch = pytest.importorskip("torch", reason="PyTorch is not installed (pip install torch==2.13.0)")

D, STEPS, SIZES = 37, 40, (20, 12, 5)  # three "tensors": clip_grad_norm_ takes the norm over all of them
BASE = dict(objective="x.py:make", workers=2, stepsize=0.05, rounds=STEPS)


def torch_run(cfg: RunConfig, x0: np.ndarray, gs: np.ndarray) -> np.ndarray:
    """The same recipe as a PyTorch user writes it, on float64 parameters; returns x after every step."""
    params = [torch.nn.Parameter(p.clone()) for p in torch.from_numpy(x0.copy()).split(SIZES)]
    lr = cfg.stepsize
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                              weight_decay=cfg.weight_decay)
    elif cfg.optimizer == "adam":
        opt = torch.optim.Adam(params, lr=lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                               weight_decay=cfg.weight_decay, foreach=False)
    else:
        opt = torch.optim.AdamW(params, lr=lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                                weight_decay=cfg.weight_decay, foreach=False)
    sched = torch_schedule(opt, cfg)
    xs = []
    for g in gs:
        for p, gp in zip(params, torch.from_numpy(g.copy()).split(SIZES)):
            p.grad = gp.clone()
        if cfg.clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, cfg.clip_norm, foreach=False)
        opt.step()
        if sched is not None:
            sched.step()
        xs.append(torch.cat([p.detach().reshape(-1) for p in params]).numpy().copy())
    return np.array(xs)


def torch_schedule(opt, cfg: RunConfig):  # type: ignore[no-untyped-def]
    from torch.optim import lr_scheduler as ls

    w = cfg.warmup
    ramp = ls.LinearLR(opt, start_factor=1 / (w + 1), end_factor=1.0, total_iters=w) if w else None
    if cfg.lr_schedule == "constant":
        return ramp
    horizon = cfg.decay_rounds if cfg.decay_rounds is not None else cfg.rounds
    cosine = ls.CosineAnnealingLR(opt, T_max=horizon - w, eta_min=cfg.min_lr)
    return cosine if ramp is None else ls.SequentialLR(opt, [ramp, cosine], milestones=[w])


def ours(cfg: RunConfig, x0: np.ndarray, gs: np.ndarray) -> np.ndarray:
    opt = make_optimizer(cfg, cfg.stepsize)
    x, state, xs = x0.copy(), opt.init(D), []
    for g in gs:
        u, state = opt.update(g, state, x)
        x += u
        xs.append(x.copy())
    return np.array(xs)


RECIPES = {
    "sgd": dict(optimizer="sgd"),
    "sgd-momentum-wd": dict(optimizer="sgd", momentum=0.9, weight_decay=0.01),
    "sgd-nesterov": dict(optimizer="sgd", momentum=0.8, nesterov=True),
    "adam": dict(optimizer="adam", weight_decay=0.01, beta2=0.98),
    "adamw": dict(optimizer="adamw", weight_decay=0.1),
    "adamw-clip-warmup-cosine": dict(optimizer="adamw", weight_decay=0.05, clip_norm=2.0, lr_schedule="cosine",
                                     warmup=8, min_lr=0.005),
    "sgd-clip-warmup-constant": dict(optimizer="sgd", momentum=0.5, clip_norm=1.0, warmup=5),
    "adam-cosine-horizon": dict(optimizer="adam", lr_schedule="cosine", decay_rounds=STEPS + 10, eps=1e-6),
}


@pytest.mark.parametrize("name", list(RECIPES))
def test_each_optimizer_equals_torch_fed_the_same_aggregates(rng, name):
    cfg = RunConfig(**BASE, **RECIPES[name])
    x0 = rng.standard_normal(D)
    # Aggregates of mixed scales (some clipped, some not), with a few coordinates exactly zero as sparse g's are.
    gs = rng.standard_normal((STEPS, D)) * rng.choice([0.05, 0.5, 5.0], size=(STEPS, 1))
    gs[:, ::7] = 0.0
    mine, theirs = ours(cfg, x0, gs), torch_run(cfg, x0, gs)
    deviation = np.abs(mine - theirs).max() / np.abs(theirs).max()
    assert deviation < 1e-13, deviation
    assert np.abs(mine[-1] - x0).max() > 1e-3  # it moved


def test_sgd_momentum_is_ef21_hb_bit_for_bit():
    """EF21-HB (``--momentum`` alone, the replica's own heavy ball) and ``--optimizer sgd --momentum`` are the same
    rule: the same bits through a whole simulated run."""
    from ef21.engine.simulate import simulate

    base = dict(problem="quadratic", dim=30, workers=3, k=3, rounds=25, stepsize=0.2, momentum=0.7)
    hb = simulate(RunConfig(**base), keep_iterates=True)
    sgd = simulate(RunConfig(**base, optimizer="sgd"), keep_iterates=True)
    np.testing.assert_array_equal(np.array(hb.xs), np.array(sgd.xs))
    assert not np.array_equal(hb.xs[0], hb.xs[-1])


def test_the_schedules_closed_forms():
    s = LrSchedule("cosine", 1.0, warmup=3, horizon=13, end=0.1)
    assert [s(t) for t in range(4)] == [0.25, 0.5, 0.75, 1.0]  # the ramp ends at the peak, never at 0
    assert s(8) == pytest.approx(0.55) and s(13) == pytest.approx(0.1) and s(50) == pytest.approx(0.1)
    c = LrSchedule("constant", 0.3, warmup=2)
    assert [c(t) for t in range(4)] == pytest.approx([0.1, 0.2, 0.3, 0.3])


@pytest.mark.parametrize("flags,match", [
    (dict(clip_norm=1.0), "--clip-norm is an option of --optimizer"),
    (dict(optimizer="lamb"), "--optimizer must be one of sgd, adam, adamw"),
    (dict(optimizer="adam", method="ef"), "does not combine with --method ef"),
    (dict(optimizer="sgd", prox="l1:0.1"), "does not combine with --prox"),
    (dict(optimizer="adamw", momentum=0.9), "--momentum is SGD's"),
    (dict(optimizer="sgd", nesterov=True), "--nesterov needs --optimizer sgd with --momentum > 0"),
    (dict(optimizer="adam", stepsize=None), "needs --stepsize"),
    (dict(optimizer="adam", beta2=1.0), "--beta2 must lie in [0, 1)"),
    (dict(optimizer="sgd", lr_schedule="cosine", warmup=50), "must exceed --warmup 50"),
    (dict(optimizer="sgd", min_lr=0.01), "are options of --lr-schedule cosine"),
])
def test_unsupported_combinations_are_one_line_errors(flags, match):
    with pytest.raises(UserError, match=match.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        RunConfig(**{**BASE, **flags})


def test_a_config_without_optimizer_flags_is_unchanged():
    cfg = RunConfig(**BASE)
    assert cfg.optimizer is None and dataclasses.replace(cfg, optimizer="sgd").optimizer == "sgd"
