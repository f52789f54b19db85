"""Benchmark: escape times by four integrators a reader could use (SPEC §7).

Two problems, each solved by

  (a) a plain fixed-step torch gradient-descent loop (the "SGD" a reader would write; full batch,
      step = 1 / lambda_max at the post-escape minimum, i.e. half the stability limit);
  (b) scipy.integrate.solve_ivp (RK45), one trajectory at a time, escape as a terminal event;
  (c) torchdiffeq's dopri5 through odeint_event, one trajectory at a time;
  (d) this package: integrate.solve with Dopri5 + PIController, all runs in one batched call;

1. the escape-time sweep of chapter 05: the scalar chain (reduced.ScalarChain, tanh, L = 6, the last
   r = 4 layers at eps, the rest at 1), eps = 1e-1 ... 1e-4 (7 values);
2. one off-manifold trajectory of chapter 06: a full width-64 tanh network, d = 32, n = 2048 fixed
   Monte-Carlo samples, depth 5, He-normal with the last r = 3 layers scaled by eps = 0.03;
3. chapter 05's whole sweep (full profile: r = 1..5, L = r + 0..2, 9 eps from 1e-1 to 1e-5, 126 runs,
   in clock-restarting legs as critical_depth.sweep does): the package batches across
   configurations -- all runs of one depth (one parameter count) share one solve per leg -- against
   scipy one trajectory at a time (methods (b) and (d) only);
4. a Part II sweep: seeds x eps of the quadratic two-layer network (sim.twolayer), (b) against (d).

Every method calls the same vector field, the package's GradientFlow of the same loss (so this
compares integrators, not gradients). The escape time is the first time the loss crosses halfway
between its initial value and the post-escape value (for the chain: the value a pilot run settles
at, escape.post_escape_reference; for the full network: 0, i.e. L = L(0)/2). The adaptive
methods (b)-(d) are all Dormand-Prince 5(4) with the same RMS error norm and atol = 1e-12; they
differ in step-size control (the package adds a predictive controller) and in batching. Two
tables: all at rtol = 1e-6, and each at its own fastest rtol on a ladder that meets 1e-3
relative t_esc error (the SPEC's accuracy target; the headline speedups use this one). The t_esc
error is relative to a tight reference: the package at rtol = 1e-10 (cross-checked against scipy's
DOP853 at rtol = 1e-12 on the sweep). Gradient descent runs to the escape when that takes at most
--sgd-max-steps steps; otherwise its time per step is measured on a bounded run and extrapolated
by the step count t_ref / lr (marked "extrapolated"; its t_esc error is then not measured).

    python benchmarks/escape_sweep.py [--json] [--smoke]

``--json`` prints one JSON object as the last line (speedup_vs_sgd, speedup_vs_scipy,
max_rel_error, overhead_fraction, speedup_vs_scipy_chapter05, max_rel_error_chapter05,
speedup_vs_scipy_part2, ...). ``--smoke`` is a tiny run for the test suite.
Wall times depend on the machine and its load; gradient evaluations do not. Each adaptive run
is timed as the best of --repeats rounds in which the methods take turns; numpy's BLAS is kept to one
thread (scipy's best case here).
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import sys
import time

# numpy's OpenBLAS threads (used by scipy's RK steps) otherwise spin against torch's own threads and
# slow scipy's gradient evaluations down by up to 2x on a small machine: give scipy its best case.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np
import torch
from scipy.integrate import solve_ivp


from saddle_escape.sim import data, escape, networks, reduced
from saddle_escape.book import set_torch_threads
from saddle_escape.sim.integrate import Event, GradientFlow, PIController, solve
from saddle_escape.sim.twolayer import TwoLayer
from saddle_escape.studies import critical_depth as cd

try:
    from torchdiffeq import odeint_event
except ImportError:  # pragma: no cover - torchdiffeq is a declared dependency
    odeint_event = None

F64 = torch.float64
RTOL, ATOL = 1e-6, 1e-12
REF_RTOL, REF_ATOL = 1e-10, 1e-14


# --------------------------------------------------------------------------- problems

class Problem:
    """A gradient flow, its initial states (B, P) and per-run escape thresholds on the loss."""

    def __init__(self, name, term, theta0, thresholds, labels, t_max):
        self.name, self.term, self.theta0 = name, term, theta0
        self.thresholds = torch.as_tensor(thresholds, dtype=F64)
        self.labels, self.t_max = labels, t_max

    def event(self):
        thr = self.thresholds
        return Event(lambda t, y, runs: self.term.loss(y) - thr[runs], direction=-1, terminal=True,
                     name="escape")


def chain_problem(eps_values, depth=6, r=4):
    chain = reduced.ScalarChain("tanh", depth, data.ScalarTeacher(1.0, 0.3))
    term = chain.term()
    norm_fn = lambda X: X[:, -r:].norm(dim=-1)
    ref = escape.post_escape_reference(term, reduced.bottleneck_scales(depth, r, 0.3), norm_fn, t_max=1e4)
    X0 = reduced.bottleneck_scales(depth, r, eps_values)
    thr = 0.5 * (term.loss(X0) + ref.loss)
    prob = Problem(f"chain L={depth} r={r}", term, X0, thr, [f"eps={e:.3g}" for e in eps_values], 1e12)
    prob.eps = np.asarray(eps_values)
    return prob


def network_problem(width=64, d=32, n=2048, depth=5, r=3, eps=0.03, seed=0):
    teacher = data.ScalarTeacher(1.0, 0.3)
    ds = data.single_index_samples(teacher, n, d, seed=seed)
    net = networks.MLP.build(d, width, depth, "tanh")
    term = GradientFlow(networks.population_loss(net, ds))
    theta0 = networks.he_normal(net, [seed], eps=eps, bottleneck=reduced.bottleneck_layers(depth, r))
    thr = 0.5 * term.loss(theta0)
    prob = Problem(f"network N={width} d={d} n={n} L={depth} r={r}", term, theta0, thr, [f"eps={eps:g}"], 1e7)
    prob.eps = np.asarray([eps])
    return prob


# --------------------------------------------------------------------------- methods

def _counted(term, fn):
    """Run ``fn`` and return (result, seconds, gradient evaluations of ``term``)."""
    c0 = term.run_evals
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0, term.run_evals - c0


def run_package(prob, rtol=RTOL, atol=ATOL):
    sol, secs, evals = _counted(prob.term, lambda: solve(
        prob.term, prob.theta0, prob.t_max, controller=PIController(rtol=rtol, atol=atol),
        events=[prob.event()]))
    return dict(t=sol.event_times[:, 0].numpy(), seconds=secs, evals=evals, calls=sol.calls,
                overhead_fraction=sol.overhead_fraction, steps=int(sol.n_steps.max()))


class _Memo:
    """Lets an event function reuse the loss of the last gradient call on the same state (scipy and
    torchdiffeq evaluate events at the step's end, which is the last stage), as the package does."""

    def __init__(self, term):
        self.term, self.key, self.val = term, None, None

    def grad(self, y_key, y2d):
        self.key, self.val = y_key, y2d
        return self.term(0.0, y2d)

    def loss(self, y_key, y2d):
        return self.term.loss(self.val if y_key is self.key else y2d)


def run_scipy(prob, method="RK45", rtol=RTOL, atol=ATOL):
    ts, secs, evals = [], 0.0, 0
    for b in range(prob.theta0.shape[0]):
        memo = _Memo(prob.term)
        thr = float(prob.thresholds[b])

        def fun(t, y):
            return memo.grad(y, torch.from_numpy(y)[None])[0].numpy()

        def ev(t, y):
            return float(memo.loss(y, torch.from_numpy(y)[None])[0]) - thr
        ev.terminal, ev.direction = True, -1
        y0 = prob.theta0[b].numpy().copy()
        sol, s, e = _counted(prob.term, lambda: solve_ivp(fun, (0.0, prob.t_max), y0, method=method,
                                                          rtol=rtol, atol=atol, events=ev))
        ts.append(sol.t_events[0][0] if len(sol.t_events[0]) else math.inf)
        secs += s
        evals += e
    return dict(t=np.asarray(ts), seconds=secs, evals=evals)


def run_torchdiffeq(prob, rtol=RTOL, atol=ATOL):
    ts, secs, evals = [], 0.0, 0
    for b in range(prob.theta0.shape[0]):
        memo = _Memo(prob.term)
        thr = float(prob.thresholds[b])
        func = lambda t, y: memo.grad(y, y[None])[0]
        event_fn = lambda t, y: memo.loss(y, y[None])[0] - thr
        with torch.no_grad():
            (t_ev, _), s, e = _counted(prob.term, lambda: odeint_event(
                func, prob.theta0[b].clone(), torch.tensor(0.0, dtype=F64), event_fn=event_fn,
                method="dopri5", rtol=rtol, atol=atol))
        ts.append(float(t_ev))
        secs += s
        evals += e
    return dict(t=np.asarray(ts), seconds=secs, evals=evals)


def sgd_step_size(prob, t_ref):
    """1 / lambda_max of the Hessian a little after the escape (half GD's stability limit 2/lambda),
    the largest curvature on the path; lambda_max by power iteration on Hessian-vector products."""
    sol = solve(prob.term, prob.theta0[:1], 1.3 * float(t_ref[0]), controller=PIController(rtol=1e-8))
    theta = sol.y_final.detach()
    loss = lambda th: prob.term.loss_fn(th[None]).sum()
    v = torch.randn(theta.shape[1], generator=torch.Generator().manual_seed(0), dtype=F64)
    lam = 0.0
    for _ in range(30):
        v = v / v.norm()
        _, hv = torch.autograd.functional.hvp(loss, theta[0], v)
        lam = float(v @ hv)
        v = hv
    return 1.0 / lam, lam


def run_sgd(prob, lr, t_ref, max_seconds, timing_steps):
    """Plain loop ``theta <- theta - lr grad L`` per run, stopping when the loss crosses the threshold
    (t_esc by linear interpolation between the two iterates). A run is first timed on
    ``timing_steps`` steps; if reaching ``t_ref / lr`` steps would then take more than
    ``max_seconds`` it stops there and its time is extrapolated by the step count."""
    rows = []
    term = prob.term
    for b in range(prob.theta0.shape[0]):
        thr = float(prob.thresholds[b])
        need = float(t_ref[b]) / lr
        theta = prob.theta0[b:b + 1].clone()
        c0, start = term.run_evals, time.perf_counter()
        t_esc, prev, k, n = math.inf, None, 0, max(timing_steps, 1)
        extrapolated = False
        while t_esc == math.inf:
            g = term(0.0, theta)               # -grad L (the loss of this state comes with it)
            L = float(term.loss(theta))
            if L <= thr:
                t_esc = lr * (k - 1 + (prev - thr) / (prev - L)) if prev is not None else 0.0
                break
            prev = L
            theta = theta + lr * g
            k += 1
            if k == n:
                per = (time.perf_counter() - start) / k
                if per * need > max_seconds:
                    extrapolated = True
                    break
                n = int(10 * need) + 10     # affordable: run on to the escape
        secs = time.perf_counter() - start
        if extrapolated:
            rows.append(dict(t=math.nan, seconds=secs / k * need, evals=int(round(need)), extrapolated=True,
                             steps=int(round(need)), timed_steps=k))
        else:
            rows.append(dict(t=t_esc, seconds=secs, evals=term.run_evals - c0, extrapolated=False, steps=k + 1))
    return rows


def fastest_tolerance(method, prob, t_ref, target, ladder, repeats):
    """The run of ``method`` at its fastest rtol on ``ladder`` (loose to tight) among those meeting
    ``target``: each passing rtol is timed (best of ``repeats``) until one takes more than twice
    the fastest so far -- tighter tolerances only cost more from there. Not simply the loosest
    passing rtol: a loose tolerance lets the steps overshoot the escape and pay in rejections."""
    best = None
    for rtol in ladder:
        if relerr(method(prob, rtol=rtol)["t"], t_ref).max() > target:
            continue
        r = best_of(repeats, lambda: method(prob, rtol=rtol))
        r["rtol"] = rtol
        if best is None or r["seconds"] < best["seconds"]:
            best = r
        elif r["seconds"] > 2 * best["seconds"]:
            break
    if best is None:
        raise RuntimeError(f"{method.__name__} missed the {target:g} t_esc error target at every rtol on {ladder}")
    return best


def best_of(n, fn):
    """Best wall time of ``n`` repeats (the others' load only ever adds time)."""
    runs = [fn() for _ in range(n)]
    return min(runs, key=lambda r: r["seconds"])


def interleaved_best(n, fns):
    """Best of ``n`` rounds for each method, the methods taking turns within a round, so that a
    slow spell of the machine hits all of them rather than the one that happened to be running."""
    runs = {name: [] for name in fns}
    for _ in range(n):
        for name, fn in fns.items():
            runs[name].append(fn())
    return {name: min(rs, key=lambda r: r["seconds"]) for name, rs in runs.items()}


# --------------------------------------------------------------------------- batched sweeps: chapter 05, Part II

HANDOFF = 0.05   # critical_depth.sweep's hand-off scale


class ChainGroup:
    """Chapter 05's runs of one depth L, every r with L - r among the offsets and every eps: one
    chain, so one parameter count, so (for the package) one batched solve per leg.

    As in :func:`critical_depth.sweep`, a run's saddle phase goes in legs that each restart the
    clock (the bottleneck RMS scale grows by at most ``critical_depth.handoff_ratio(r)`` per leg,
    up to ``HANDOFF``), then the escape leg stops at the loss threshold, halfway between the
    initial loss and the post-escape value of the (r, L) pilot. t_esc is the sum of the legs."""

    def __init__(self, depth, r_values, eps, activation="tanh"):
        chain = reduced.ScalarChain(activation, depth, data.ScalarTeacher(1.0, 0.3))
        self.term = cd.ChainFlow(chain)
        self.depth, self.name = depth, f"L={depth} r={list(r_values)}"
        X0, thr, masks, rs, t_max, self.goals = [], [], [], [], [], []
        for r in r_values:
            a = cd.leading_rate(chain, r)
            pilot_eps = max(0.3 if r >= 2 else 0.1, float(np.max(eps)))
            ref = escape.post_escape_reference(
                self.term, cd.initial_scales(depth, r, [pilot_eps]), cd.bottleneck_norm(r),
                t_max=1e3 * (float(cd.integral_T(pilot_eps, r) / a) + 10.0))
            x0 = cd.initial_scales(depth, r, eps)
            X0.append(x0)
            thr.append(0.5 * (self.term.loss(x0) + ref.loss))
            t_max.append(20.0 * (np.maximum(cd.integral_T(eps, r), 0) / a + ref.time))
            for e in eps:
                rs.append(r)
                masks.append([1.0 if l < r else 0.0 for l in range(depth)])
                goals, y = [], float(e)
                while y < HANDOFF:
                    y = min(y * cd.handoff_ratio(r), HANDOFF)
                    goals.append(y)
                self.goals.append(goals)
        self.X0, self.thresholds = torch.cat(X0), torch.cat(thr)
        self.mask, self.r = torch.tensor(masks, dtype=F64), torch.tensor(rs, dtype=F64)
        self.t_max = torch.as_tensor(np.concatenate(t_max), dtype=F64)

    def rms(self, y, runs):
        return ((y * y * self.mask[runs]).sum(-1) / self.r[runs]).sqrt()


def _legs_package(g, rtol, atol):
    """One group, all runs batched: saddle legs (runs with that many legs), then the escape."""
    ctrl = PIController(rtol=rtol, atol=atol)
    X, T, calls = g.X0.clone(), torch.zeros(g.X0.shape[0], dtype=F64), 0
    for k in range(max(map(len, g.goals))):
        idx = torch.tensor([b for b, gl in enumerate(g.goals) if len(gl) > k])
        goal = torch.tensor([g.goals[b][k] for b in idx.tolist()], dtype=F64)   # per row of X[idx]
        event = Event(lambda t, y, runs, idx=idx, goal=goal: goal[runs] - g.rms(y, idx[runs]), -1,
                      terminal=True)
        sol = solve(g.term, X[idx], torch.clamp(g.t_max[idx] - T[idx], min=1e-12), controller=ctrl,
                    events=[event])
        T[idx] += sol.event_times[:, 0]
        X[idx] = sol.y_final
        calls += sol.calls
    thr = g.thresholds
    sol = solve(g.term, X, torch.clamp(g.t_max - T, min=1e-12), controller=ctrl,
                events=[Event(lambda t, y, runs: g.term.loss(y) - thr[runs], -1, terminal=True)])
    return (T + sol.event_times[:, 0]).numpy(), calls + sol.calls


def _legs_scipy(g, rtol, atol, method="RK45"):
    """One group, one run at a time, the same legs with scipy's solve_ivp."""
    ts = []
    for b in range(g.X0.shape[0]):
        memo = _Memo(g.term)
        fun = lambda t, y: memo.grad(y, torch.from_numpy(y)[None])[0].numpy()
        y, T, r = g.X0[b].numpy().copy(), 0.0, int(g.r[b])
        t_max = float(g.t_max[b])
        for goal in g.goals[b]:
            ev = lambda t, y, goal=goal: goal - math.sqrt(float(np.dot(y[:r], y[:r])) / r)
            ev.terminal, ev.direction = True, -1
            sol = solve_ivp(fun, (0.0, max(t_max - T, 1e-12)), y, method=method, rtol=rtol, atol=atol, events=ev)
            if not len(sol.t_events[0]):
                T = math.inf
                break
            T += sol.t_events[0][0]
            y = sol.y_events[0][0]
        if math.isfinite(T):
            thr = float(g.thresholds[b])
            ev = lambda t, y: float(memo.loss(y, torch.from_numpy(y)[None])[0]) - thr
            ev.terminal, ev.direction = True, -1
            sol = solve_ivp(fun, (0.0, max(t_max - T, 1e-12)), y, method=method, rtol=rtol, atol=atol, events=ev)
            T = T + sol.t_events[0][0] if len(sol.t_events[0]) else math.inf
        ts.append(T)
    return np.asarray(ts)


class Chapter05:
    """Chapter 05's whole sweep: every (r, L = r + offset) and eps, grouped by depth."""

    def __init__(self, r_values=(1, 2, 3, 4, 5), depth_offsets=(0, 1, 2), eps_min=1e-5, eps_max=1e-1,
                 n_eps=9, activation="tanh"):
        self.eps = np.logspace(np.log10(eps_max), np.log10(eps_min), n_eps)
        by_depth = {}
        for r, depth in cd.configurations(r_values, depth_offsets):
            by_depth.setdefault(depth, []).append(r)
        self.groups = [ChainGroup(depth, rs, self.eps, activation) for depth, rs in sorted(by_depth.items())]
        self.n_configs = sum(len(rs) for rs in by_depth.values())
        self.name = (f"chapter 05 whole sweep: {self.n_configs} (r, L), {n_eps} eps "
                     f"({eps_max:g} ... {eps_min:g}), {len(self.groups)} depths")

    @property
    def n_runs(self):
        return sum(g.X0.shape[0] for g in self.groups)


def run_package_ch05(sweep, rtol=RTOL, atol=ATOL):
    c0 = [g.term.run_evals for g in sweep.groups]
    t0 = time.perf_counter()
    outs = [_legs_package(g, rtol, atol) for g in sweep.groups]
    secs = time.perf_counter() - t0
    return dict(t=np.concatenate([o[0] for o in outs]), seconds=secs, calls=sum(o[1] for o in outs),
                evals=sum(g.term.run_evals - c for g, c in zip(sweep.groups, c0)))


def run_scipy_ch05(sweep, rtol=RTOL, atol=ATOL, method="RK45"):
    c0 = [g.term.run_evals for g in sweep.groups]
    t0 = time.perf_counter()
    t = np.concatenate([_legs_scipy(g, rtol, atol, method) for g in sweep.groups])
    return dict(t=t, seconds=time.perf_counter() - t0,
                evals=sum(g.term.run_evals - c for g, c in zip(sweep.groups, c0)))


def run_package_problem(prob, rtol=RTOL, atol=ATOL):
    return run_package(prob, rtol, atol)


def twolayer_problem(seeds=(0, 1, 2, 3), eps_values=(1e-1, 3e-2, 1e-2, 3e-3, 1e-3), d=8, width=16, n=512):
    """Part II: seeds x eps of the quadratic two-layer network (``TwoLayer.build("quadratic")``)
    on a quadratic single-index teacher, gradient flow ``net.flow(data)``; escape when the loss
    crosses halfway to the value the seed's pilot run (at the largest eps) settles at."""
    net = TwoLayer.build("quadratic", d, width)
    ds = data.single_index_samples(data.ScalarTeacher(0.0, 1.0), n, d, seed=0)
    term = net.flow(ds)
    norm = lambda X: X.norm(dim=-1)
    seeds, eps_values = list(seeds), [float(e) for e in eps_values]
    theta0, thr, labels = [], [], []
    for seed in seeds:
        ref = escape.post_escape_reference(term, net.init(max(eps_values), [seed]), norm,
                                           t_max=1e3 / min(eps_values))
        x0 = net.init(torch.tensor(eps_values), [seed] * len(eps_values))
        theta0.append(x0)
        thr.append(0.5 * (term.loss(x0) + ref.loss))
        labels += [f"seed={seed} eps={e:g}" for e in eps_values]
    prob = Problem(f"Part II: quadratic two-layer net d={d} H={width} n={n}, {len(seeds)} seeds x "
                   f"{len(eps_values)} eps", term, torch.cat(theta0), torch.cat(thr), labels,
                   1e3 / min(eps_values))
    prob.eps = np.tile(eps_values, len(seeds))
    return prob


def batched_row(name, prob, package, scipy_fn, args, ladder):
    """Package (batched) against scipy (one run at a time), each at its fastest rtol on `ladder`
    meeting the accuracy target, timed best of interleaved rounds; the reference is the package
    at rtol 1e-10."""
    print(f"\n== {name}", flush=True)
    t_ref = package(prob, REF_RTOL, REF_ATOL)["t"]
    if not np.isfinite(t_ref).all():
        raise RuntimeError(f"{name}: the reference missed {int((~np.isfinite(t_ref)).sum())} escapes")
    repeats = max(1, min(args.repeats, 3))
    methods = {"(b) scipy solve_ivp RK45": scipy_fn, "(d) this package": package}
    rtols = {m: fastest_tolerance(fn, prob, t_ref, args.target, ladder, repeats)["rtol"]
             for m, fn in methods.items()}
    res = interleaved_best(args.repeats, {m: functools.partial(fn, prob, rtol=rtols[m]) for m, fn in methods.items()})
    widths = [26, 10, 14, 12, 9]
    print(f"{len(t_ref)} runs; each method at its fastest rtol meeting {args.target:g} relative t_esc error")
    print(fmt_row(["method", "wall [s]", "grad evals", "max rel err", "rtol"], widths))
    table = {}
    for m in methods:
        r = res[m]
        err = float(relerr(r["t"], t_ref).max())
        note = f"{r['calls']} batched calls" if "calls" in r else ""
        print(fmt_row([m, f"{r['seconds']:.3g}", f"{r['evals']:,}", f"{err:.1e}", f"{rtols[m]:.0e}"], widths), note)
        table[m] = dict(seconds=r["seconds"], grad_evals=int(r["evals"]), rtol=rtols[m], max_rel_error=err)
    speedup = res["(b) scipy solve_ivp RK45"]["seconds"] / res["(d) this package"]["seconds"]
    print(f"speedup vs scipy: {speedup:.3g}x")
    return dict(speedup_vs_scipy=speedup, max_rel_error=table["(d) this package"]["max_rel_error"],
                n_runs=len(t_ref), table=table)


# --------------------------------------------------------------------------- the run

def relerr(t, ref):
    t, ref = np.asarray(t, float), np.asarray(ref, float)
    return np.abs(t - ref) / ref


def fmt_row(cols, widths):
    return "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(cols, widths)))


ADAPTIVE = {"(b) scipy solve_ivp RK45": run_scipy, "(c) torchdiffeq dopri5": run_torchdiffeq,
            "(d) this package": run_package}
ORDER = ["(a) torch GD loop", "(a') GD, accuracy-matched", "(b) scipy solve_ivp RK45", "(c) torchdiffeq dopri5", "(d) this package"]


def bench_problem(prob, args, out, crosscheck=False):
    print(f"\n== {prob.name}: {', '.join(prob.labels)}", flush=True)
    ref = run_package(prob, REF_RTOL, REF_ATOL)
    t_ref = ref["t"]
    info = dict(reference_evals=ref["evals"], t_ref=t_ref.tolist())
    line = f"reference: package Dopri5 rtol={REF_RTOL:g}"
    if crosscheck:
        dop = run_scipy(prob, "DOP853", 1e-12, 1e-14)
        info["reference_vs_scipy_dop853"] = float(relerr(dop["t"], t_ref).max())
        line += f"; scipy DOP853 at rtol=1e-12 agrees to {info['reference_vs_scipy_dop853']:.1e} (relative t_esc)"
    print(line)
    lr, lam = sgd_step_size(prob, t_ref)
    info.update(sgd_lr=lr, lambda_max=lam)
    print(f"gradient descent: lr = 1/lambda_max = {lr:.4g} (lambda_max = {lam:.4g} just after the escape)")

    methods = {k: v for k, v in ADAPTIVE.items() if k != "(c) torchdiffeq dopri5" or odeint_event is not None}
    tables = {}
    for policy in args.policies:
        rtols = {name: fastest_tolerance(fn, prob, t_ref, args.target, args.ladder, args.repeats)["rtol"]
                 if policy == "tuned" else RTOL for name, fn in methods.items()}
        res = interleaved_best(args.repeats, {name: functools.partial(fn, prob, rtol=rtols[name])
                                              for name, fn in methods.items()})
        for name in res:
            res[name]["rtol"] = rtols[name]
        tables[policy] = res

    sgd = run_sgd(prob, lr, t_ref, args.sgd_max_seconds, args.sgd_timing_steps)
    gd = dict(t=np.array([r["t"] for r in sgd]), seconds=sum(r["seconds"] for r in sgd),
              evals=sum(r["evals"] for r in sgd), extrapolated=[r["extrapolated"] for r in sgd])
    # gradient descent at the step that would meet the accuracy target: its t_esc error is first
    # order in lr (tests/test_integrate.py), so lr_acc = lr * target / (measured error); the time
    # follows from the measured time per step and the step count t_ref / lr_acc (an estimate)
    gd_err = relerr(gd["t"], t_ref)
    gd_err = gd_err[np.isfinite(gd_err)]
    shrink = min(1.0, args.target / gd_err.max()) if gd_err.size and gd_err.max() > 0 else 1.0
    lr_acc = lr * shrink
    acc = dict(t=np.full(len(sgd), np.nan), seconds=sum(r["seconds"] / shrink for r in sgd),
               evals=int(sum(r["evals"] / shrink for r in sgd)), extrapolated=[True] * len(sgd), lr=lr_acc)
    info.update(sgd_lr_accuracy_matched=lr_acc)

    widths = [26, 10, 14, 12, 9, 24]
    out[prob.name] = dict(sgd_runs=sgd, **info)
    for policy, res in tables.items():
        res["(a) torch GD loop"] = gd
        res["(a') GD, accuracy-matched"] = acc
        title = ("each adaptive method at its fastest rtol on the ladder meeting "
                 f"{args.target:g} relative t_esc error" if policy == "tuned" else
                 f"all adaptive methods at rtol = {RTOL:g}, atol = {ATOL:g}")
        print(f"-- {title}")
        print(fmt_row(["method", "wall [s]", "grad evals", "max rel err", "rtol", "note"], widths))
        table = {}
        for name in ORDER:
            if name not in res:
                continue
            r = res[name]
            err = relerr(r["t"], t_ref)
            measured = err[np.isfinite(err)]
            note = ""
            if "extrapolated" in r:
                nx = sum(r["extrapolated"])
                note = f"{nx}/{len(err)} runs extrapolated" if nx else "all runs to escape"
            if "lr" in r:
                note = "estimate (steps x time/step)"
            if "overhead_fraction" in r:
                note = f"overhead {100 * r['overhead_fraction']:.0f}%, {r['calls']} calls"
            e_str = f"{measured.max():.1e}" if measured.size else "n/a"
            rt = f"{r['rtol']:.0e}" if "rtol" in r else f"lr {r.get('lr', lr):.3g}"
            print(fmt_row([name, f"{r['seconds']:.3g}", f"{r['evals']:,}", e_str, rt, note], widths))
            table[name] = dict(seconds=r["seconds"], grad_evals=int(r["evals"]), rtol=r.get("rtol"),
                               max_rel_error=float(measured.max()) if measured.size else None,
                               rel_errors=[None if not math.isfinite(x) else float(x) for x in err], note=note)
        out[prob.name][policy] = table
    print("gradient descent per run: " + "; ".join(
        f"{lab} (t_ref={t:.4g}): {'~' if r['extrapolated'] else ''}{r['seconds']:.3g} s"
        + (f" [extrapolated from {r['timed_steps']} of {r['steps']:,} steps]" if r["extrapolated"] else "")
        for lab, t, r in zip(prob.labels, t_ref, sgd)))
    return tables, sgd, t_ref


def denser_sweep(args, tuned, n_eps):
    """The chain sweep again with ``n_eps`` values over the same range, scipy and the package at
    the rtols the tuned table chose: what batching buys as a reader adds runs."""
    prob = chain_problem([float(e) for e in np.logspace(-1, -4, n_eps)])
    t_ref = run_package(prob, REF_RTOL, REF_ATOL)["t"]
    names = ("(b) scipy solve_ivp RK45", "(d) this package")
    res = interleaved_best(args.repeats, {n: functools.partial(ADAPTIVE[n], prob, rtol=tuned[n]["rtol"]) for n in names})
    print(f"\n== the same sweep with {n_eps} eps values (1e-1 ... 1e-4), each method at the rtol chosen above")
    widths = [26, 10, 14, 12, 9]
    print(fmt_row(["method", "wall [s]", "grad evals", "max rel err", "rtol"], widths))
    for n in names:
        r = res[n]
        print(fmt_row([n, f"{r['seconds']:.3g}", f"{r['evals']:,}", f"{relerr(r['t'], t_ref).max():.1e}",
                       f"{tuned[n]['rtol']:.0e}"], widths))
    return dict(n_eps=n_eps, speedup_vs_scipy=res[names[0]]["seconds"] / res[names[1]]["seconds"],
                max_rel_error=float(max(relerr(res[n]["t"], t_ref).max() for n in names)))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", action="store_true", help="print one JSON summary as the last line")
    ap.add_argument("--smoke", action="store_true", help="tiny run (2 eps values, few GD steps, small network)")
    ap.add_argument("--sgd-max-seconds", type=float, default=10.0,
                    help="run GD to the escape when that takes at most this long, else extrapolate")
    ap.add_argument("--sgd-timing-steps", type=int, default=1000, help="steps timed before deciding")
    ap.add_argument("--repeats", type=int, default=5, help="timed repeats per adaptive method (best is kept)")
    ap.add_argument("--no-network", action="store_true", help="skip the full-network trajectory")
    ap.add_argument("--no-chapter05", action="store_true", help="skip chapter 05's whole sweep")
    ap.add_argument("--no-part2", action="store_true", help="skip the Part II (quadratic two-layer) sweep")
    args = ap.parse_args(argv)
    args.target = 1e-3
    args.ladder = [1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 3e-5, 1e-5, 1e-6]
    args.policies = ["tuned", "same"]
    if args.smoke:
        args.sgd_max_seconds, args.sgd_timing_steps, args.repeats = 0.5, 50, 1
        args.ladder = [1e-2, 1e-4, 1e-6]
    set_torch_threads()   # one thread for every method, as in the book
    torch.manual_seed(0)
    print(f"escape-time benchmark: torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"{platform.machine()}, float64, CPU. Wall times are best of {args.repeats} interleaved rounds and depend on the "
          "machine's load; gradient evaluations (per run) do not.")

    out = {}
    eps = [1e-1, 1e-2] if args.smoke else [float(e) for e in np.logspace(-1, -4, 7)]
    chain = chain_problem(eps)
    tables, sgd, t_ref = bench_problem(chain, args, out, crosscheck=not args.smoke)
    tuned, same = tables["tuned"], tables["same"]
    pkg = tuned["(d) this package"]
    small = chain.eps <= 1e-3 * (1 + 1e-9)
    sel = small if small.any() else np.ones_like(small)
    sgd_small = sum(r["seconds"] for r, s in zip(sgd, sel) if s)
    summary = dict(
        speedup_vs_sgd=sgd_small / pkg["seconds"],
        speedup_vs_sgd_scope=("GD time of the eps <= 1e-3 runs (extrapolated) / package time of the whole sweep"
                              if small.any() else "GD time of all runs / package time (no eps <= 1e-3 here)"),
        speedup_vs_sgd_whole_sweep=sum(r["seconds"] for r in sgd) / pkg["seconds"],
        speedup_vs_sgd_accuracy_matched=tuned["(a') GD, accuracy-matched"]["seconds"] / pkg["seconds"],
        speedup_vs_scipy=tuned["(b) scipy solve_ivp RK45"]["seconds"] / pkg["seconds"],
        speedup_vs_scipy_same_rtol=same["(b) scipy solve_ivp RK45"]["seconds"] / same["(d) this package"]["seconds"],
        speedup_vs_torchdiffeq=(tuned["(c) torchdiffeq dopri5"]["seconds"] / pkg["seconds"]
                                if "(c) torchdiffeq dopri5" in tuned else None),
        max_rel_error=float(relerr(pkg["t"], t_ref).max()),
        overhead_fraction=pkg["overhead_fraction"],
        overhead_fraction_same_rtol=same["(d) this package"]["overhead_fraction"],
        rtol_package=pkg["rtol"], rtol_scipy=tuned["(b) scipy solve_ivp RK45"]["rtol"],
        grad_evals_package=int(pkg["evals"]), grad_calls_package=int(pkg["calls"]),
        grad_evals_scipy=int(tuned["(b) scipy solve_ivp RK45"]["evals"]),
        sweep_seconds=pkg["seconds"],
    )
    dense = denser_sweep(args, tuned, 4 if args.smoke else 28)
    summary.update(speedup_vs_scipy_denser_sweep=dense["speedup_vs_scipy"], denser_sweep_n_eps=dense["n_eps"],
                   denser_sweep_max_rel_error=dense["max_rel_error"])
    if not args.no_network:
        net = network_problem(width=16, d=8, n=256, depth=4, r=3, eps=0.1) if args.smoke else network_problem()
        args.policies = ["same"]      # one trajectory: no batching, all at the same rtol
        ntables, nsgd, nref = bench_problem(net, args, out)
        nres = ntables["same"]
        npkg = nres["(d) this package"]
        summary.update(
            network_speedup_vs_sgd=sum(r["seconds"] for r in nsgd) / npkg["seconds"],
            network_speedup_vs_sgd_accuracy_matched=nres["(a') GD, accuracy-matched"]["seconds"] / npkg["seconds"],
            network_speedup_vs_scipy=nres["(b) scipy solve_ivp RK45"]["seconds"] / npkg["seconds"],
            network_max_rel_error=float(relerr(npkg["t"], nref).max()),
            network_overhead_fraction=npkg["overhead_fraction"],
        )
    ladder = [1e-2, 1e-3, 1e-4] if args.smoke else [3e-3, 1e-3, 3e-4, 1e-4, 3e-5, 1e-5]
    if not args.no_chapter05:
        ch05 = (Chapter05(r_values=(2, 3), depth_offsets=(0,), eps_min=1e-3, n_eps=3) if args.smoke
                else Chapter05())
        row = batched_row(ch05.name, ch05, run_package_ch05, run_scipy_ch05, args, ladder)
        out["chapter05"] = row
        summary.update(speedup_vs_scipy_chapter05=row["speedup_vs_scipy"],
                       max_rel_error_chapter05=row["max_rel_error"], chapter05_runs=row["n_runs"])
    if not args.no_part2:
        p2 = (twolayer_problem(seeds=(0, 1), eps_values=(1e-1, 1e-2), d=4, width=4, n=64) if args.smoke
              else twolayer_problem())
        row = batched_row(p2.name, p2, run_package_problem, run_scipy, args, ladder)
        out["part2_quadratic"] = row
        summary.update(speedup_vs_scipy_part2=row["speedup_vs_scipy"],
                       max_rel_error_part2=row["max_rel_error"], part2_runs=row["n_runs"])
    targets = dict(speedup_vs_sgd=(">=", 1000), speedup_vs_scipy=(">=", 5), max_rel_error=("<=", 1e-3),
                   overhead_fraction=("<=", 0.5))
    if "speedup_vs_scipy_chapter05" in summary:
        targets.update(speedup_vs_scipy_chapter05=(">=", 10), max_rel_error_chapter05=("<=", 1e-3))
    print("\nTargets (SPEC §7 on the 7-value sweep; issue 14 on chapter 05's whole sweep), tuned tolerances:")
    met = {}
    for k, (op, v) in targets.items():
        ok = summary[k] >= v if op == ">=" else summary[k] <= v
        met[k] = bool(ok)
        print(f"  {k:20s} {summary[k]:12.4g}  target {op} {v:g}  {'met' if ok else 'MISSED'}")
    print(f"  (at the same rtol = {RTOL:g} for all: speedup_vs_scipy {summary['speedup_vs_scipy_same_rtol']:.3g}, "
          f"overhead {summary['overhead_fraction_same_rtol']:.2f}; with {summary['denser_sweep_n_eps']} eps values: "
          f"speedup_vs_scipy {summary['speedup_vs_scipy_denser_sweep']:.3g})")
    summary["targets_met"] = met
    summary["smoke"] = bool(args.smoke)
    summary["details"] = out
    if args.json:
        print(json.dumps(summary, default=float))
    return summary


if __name__ == "__main__":
    main()
    sys.exit(0)
