"""Training to an exact target L0: thresholds calibrated from the data at the start, then moved
every step by a controller outside Adam (minisae train --target-l0; JumpReLU and Gated).

Legend: M latents, n tokens in the calibration sample. t_i is latent i's threshold in control
units: JumpReLU log θ_i (the paper's parameter), or θ_i / u (raw θ, u the mean calibrated θ);
Gated −b_gate_i / σ (its gate opens where x_c·w_i > −b_gate_i; σ the spread of x_c·w over the
calibration sample). L0* is the target, L0_t the L0 of step t's batch (measured in the step's
forward pass), W the L0 warm-up (cfg.l0_warmup_steps), W_λ the λ warm-up (sparsity_warmup_steps).

Why λ cannot do it (docs/derivations/l0_controller.md): Adam moves a parameter by about
lr·m/√v per step, and m/√v ≈ ±1 for a gradient of steady sign whatever its size, so raising λ
cannot move θ faster than lr per step: at JumpReLU's lr 7e-5, log θ needs ~70,000 steps to travel
from Gemma Scope's θ = 0.001 to where the pre-activations are. λ sets the direction of Adam's
push on θ, not its speed.

1. Calibration (a fresh run, batch 0): θ*_i = halfway between the (c+1)-th and the c-th largest
   π_i of the sample, c = round(n·L0*/M) (Gated: b_gate*_i = minus that of x_c·w_i), so each
   latent fires on the fraction L0*/M of the sample. With an L0 warm-up every threshold then
   starts one shift s below, t_i = t*_i − s, s the smallest giving the sample L0 = L0_0.
2. L0 warm-up (in runs whose weights can travel, lr·steps >= 1; cfg.l0_warmup_steps): the
   controller's target descends from L0_0 = min(8·L0*, max(L0*, c·M)) to L0* over W steps
   (c = 1/4 JumpReLU, 1/10 Gated),
       L0*_t = L0_0·(L0*/L0_0)^g(t),   g(t) = (1 − cos(π·min(1, t/W))) / 2,
   and every threshold rises by s·(g(t+1) − g(t)) a step (feed-forward: each ends at its own t*_i
   where the weights have not moved). Every latent fires often while the dictionary forms
   (started at L0* the latents' random directions fire too rarely to learn, and a third to a half
   of them die).
3. Control, after every optimiser step:
       e_t = clip(log((L0_t + 0.1) / (L0*_t + 0.1)), −1, 1),   I_t = clip(I_{t−1} + e_t, −100, 100)
   JumpReLU: with Δt Adam's step of the thresholds (the controller remembers t as it left it),
       - after the λ warm-up, λ follows Adam's net push p = ΣΔt_i / Σ|Δt_i| in [−1, 1]:
         log λ <- log λ − 0.01·(p − 0.3), within a factor 100 of λ_0. At p = 0.3 the penalty's
         push slightly outweighs the reconstruction's, so the correction below lowers the
         thresholds and quiet latents drift back toward firing. λ ends near the slope −dFVU/dL0
         at the target, which a fixed λ would have to be tuned to (held too low, latents die);
         with the quadratic penalty, whose pull vanishes at L0*, λ stays fixed;
       - Adam's step loses the uniform shift that moves L0 to first order,
         t_i <- t_i − Σ_j f_j Δt_j / Σ_j f_j  (f_j: tokens latent j fired on in the batch);
       - every threshold moves alike: t_i <- t_i + 0.1·e_t + 0.002·I_t.
   Gated: λ moves by PI, log λ = log λ_0 + 0.5·e_t + 0.05·I_t (λ sets the balance of Adam's push
       on W_enc and b_gate through the L1 term, which at a high lr moves the gates faster than the
       controller could); the thresholds by t_i <- t_i + 0.02·e_t·min(w_i / mean w, 4),
       w_i = f_i + 0.1·mean f, which holds L0 where Adam is too slow.

The gains do not scale with lr, so the final lr decay does not freeze the controller. Its state is
four floats (I, the unit u or σ, log λ, s), all bounded; the t it left is the parameters
themselves (the checkpoint holds them), and the step gives the warm-up's target. It reads one
number and one (M,) count per step (the batch L0 and f; under data parallelism both summed over
ranks), so it is rank-independent; a resumed run repeats the uninterrupted one bit for bit.

Limits: a raw θ projected to 0 stays where Adam puts it (the move is clamped at 0 too); if the
weights change L0 faster than the gains allow (the first tens of steps at lr 1e-2), L0 lags the
target meanwhile; a latent whose sample never exceeds 0 starts at θ = bandwidth.
"""

import math

import numpy

from minisae.errors import CheckpointError
from minisae.xp import to_numpy, xp_of

GAIN = {"jumprelu": 0.1, "gated": 0.02}  # proportional gain: the control move per unit of error (threshold units)
KI = 0.002              # JumpReLU: integral gain
INTEGRAL_MAX = 100.0    # |integral| ≤ this (JumpReLU: the integral's move is at most KI · INTEGRAL_MAX = 0.2 per step)
ERROR_CLIP = 1.0        # |e_t| ≤ this (log L0 units)
L0_OFFSET = 0.1         # keeps log L0 finite when a batch has no active latent
START_FACTOR = 8.0      # the L0 warm-up starts at min(8·L0*, max(L0*, START_DENSITY·M))
# ... at most M/4 (the dense paths' cost); Gated M/10: started at 512 of 2,560 latents on Gemma 3's
# layer 6 its gates closed for good in 3 of 4 runs (Adam, at lr 1e-3, moved them ~25 × faster than
# the controller), from 256 in none (docs/derivations/l0_controller.md)
START_DENSITY = {"jumprelu": 0.25, "gated": 0.10}
ADAPT_RATE = 0.01       # JumpReLU: log λ moves by this × (p − PUSH_TARGET) per step
PUSH_TARGET = 0.3       # JumpReLU: the net direction p of Adam's threshold step that λ is steered to
ADAPT_RANGE = 100.0     # JumpReLU: λ stays in [λ_0 / 100, λ_0 × 100]
FIRED_FLOOR = 0.1       # Gated: weights w_i = fired_i + this × mean fired (a silent latent still moves a little)
WEIGHT_MAX = 4.0        # Gated: no latent's control move is more than this × the mean move
STATE_FORMAT = "minisae-l0-controller-3"
CALIBRATION_ENTRIES = 1 << 24  # most (tokens × latents) pre-activations held at once while calibrating
KINDS = ("log_threshold", "threshold", "b_gate")
COEFF_KP, COEFF_KI = 0.5, 0.05  # Gated: log λ = log λ_0 + COEFF_KP·e + COEFF_KI·integral
COEFF_RANGE = math.exp(COEFF_KP * ERROR_CLIP + COEFF_KI * INTEGRAL_MAX)  # Gated: λ in [λ_0 / 245, λ_0 × 245]


def start_l0(target, d_sae, warmup_steps, architecture="jumprelu"):
    """L0_0, where the L0 warm-up starts: min(8·L0*, max(L0*, c·M)), c = START_DENSITY[architecture];
    L0* without a warm-up."""
    if warmup_steps <= 0:
        return float(target)
    return min(START_FACTOR * float(target), max(float(target), START_DENSITY[architecture] * d_sae))


class L0Controller:
    """Moves the thresholds toward the target L0 after every optimiser step (the module docstring).
    kind: the parameter moved ("log_threshold", "threshold" or "b_gate"); unit: the threshold unit
    of "threshold" and "b_gate" (set by the calibration); integral: the bounded integral; start,
    warmup: the L0 warm-up (L0_0 and W steps); coeff0: λ_0; log_coeff: the λ reached (None: λ_0);
    adapt: "push" (JumpReLU: λ follows Adam's threshold push from step adapt_from on), "pi"
    (Gated: λ by PI on the error) or None (λ fixed at λ_0)."""

    def __init__(self, target, kind, *, gain=GAIN["jumprelu"], unit=1.0, integral=0.0, start=None, warmup=0,
                 ramp=0.0, coeff0=None, log_coeff=None, adapt=None, adapt_from=0):
        if not target > 0 or kind not in KINDS or adapt not in (None, "push", "pi"):
            raise ValueError(f"L0Controller: expected target > 0, one of {KINDS} and adapt None, 'push' or 'pi', "
                             f"found {target}, {kind!r}, {adapt!r}")
        if not (gain > 0 and math.isfinite(gain) and unit > 0 and math.isfinite(unit)
                and abs(integral) <= INTEGRAL_MAX and warmup >= 0 and math.isfinite(ramp)):
            raise ValueError(f"L0Controller: expected gain > 0, unit > 0, |integral| <= {INTEGRAL_MAX} and "
                             f"warmup >= 0, found {gain}, {unit}, {integral}, {warmup}")
        if adapt is not None and coeff0 is None:
            raise ValueError("L0Controller: adapting λ needs its starting value coeff0")
        self.target, self.kind, self.gain = float(target), kind, float(gain)
        self.unit, self.integral = float(unit), float(integral)
        self.start_l0 = self.target if start is None else float(start)
        self.warmup, self.ramp, self.adapt, self.adapt_from = int(warmup), float(ramp), adapt, int(adapt_from)
        self.prev = None  # (M,) float64 thresholds t after the last correction (= the parameters then)
        self.log_coeff0 = None if coeff0 is None else math.log(float(coeff0))
        self.log_coeff = self.log_coeff0 if log_coeff is None else float(log_coeff)
        span = math.log(ADAPT_RANGE if adapt == "push" else COEFF_RANGE)
        if self.log_coeff0 is not None and not abs(self.log_coeff - self.log_coeff0) <= span + 1e-9:
            raise ValueError(f"L0Controller: λ = exp({log_coeff}) is further than a factor {math.exp(span):.3g} "
                             f"from λ0 = {coeff0}")

    def coeff(self):
        """λ for the next step: the configured value (None) or the controller's."""
        return None if self.log_coeff is None else math.exp(self.log_coeff)

    def target_at(self, step):
        """L0*_t: the L0 warm-up's target at `step`, L0_0·(L0*/L0_0)^min(1, t/W)."""
        if step >= self.warmup:
            return self.target
        return self.start_l0 * (self.target / self.start_l0) ** self.progress(step)

    def progress(self, step):
        """How far the L0 warm-up is at `step`, 0 to 1: (1 − cos(π·t/W)) / 2 (it starts and ends
        slowly: the weights' own drift of L0, large while the dictionary forms, fades as it ends)."""
        u = min(1.0, step / self.warmup) if self.warmup else 1.0
        return (1 - math.cos(math.pi * u)) / 2

    def error(self, l0, step):
        """e = clip(log((L0 + 0.1) / (L0*_t + 0.1)), −1, 1) for a batch L0 (a float) at `step`."""
        e = math.log((float(l0) + L0_OFFSET) / (self.target_at(step) + L0_OFFSET))
        return min(ERROR_CLIP, max(-ERROR_CLIP, e))

    def thresholds(self, params):
        """t (M,) float64, the thresholds in control units: log θ, θ / unit, or −b_gate / unit."""
        p = params[self.kind].astype(numpy.float64)  # (M,)
        if self.kind == "log_threshold":
            return p
        return p / self.unit if self.kind == "threshold" else p / -self.unit

    def _set(self, params, t):
        p = params[self.kind]
        xp = xp_of(p)
        if self.kind == "log_threshold":
            p[...] = t
        elif self.kind == "threshold":
            p[...] = xp.maximum(t * self.unit, 0.0)  # raw θ stays >= 0
        else:
            p[...] = t * -self.unit

    def start(self, params):
        """Remember the thresholds as they are (a fresh run after calibration, or a resumed run:
        the checkpoint's parameters are those right after the last correction)."""
        self.prev = self.thresholds(params)

    def after_step(self, params, l0, fired, step):
        """After step `step`'s optimiser update, in place: l0 the batch L0 of the step's forward
        pass (before the update), fired (M,) on how many of the batch's tokens each latent fired.
        Returns e."""
        e = self.error(l0, step)
        self.integral = min(INTEGRAL_MAX, max(-INTEGRAL_MAX, self.integral + e))
        t = self.thresholds(params)  # (M,)
        xp = xp_of(t)
        w = xp.asarray(fired, dtype=numpy.float64)  # (M,)
        if self.adapt == "pi":  # Gated: λ by PI, the thresholds by the proportional move, most where they fire
            self.log_coeff = self.log_coeff0 + COEFF_KP * e + COEFF_KI * self.integral
            w = w + FIRED_FLOOR * float(to_numpy(w.mean())) + 1e-12  # (M,) > 0
            move = self.gain * e * xp.minimum(w / w.mean(), WEIGHT_MAX)  # (M,)
        else:  # JumpReLU: Adam's mean threshold step taken back, λ after its net push, the thresholds by PI
            if self.prev is not None:
                d = t - self.prev  # (M,) Adam's step of the thresholds
                size = float(to_numpy(abs(d).sum()))
                if self.adapt == "push" and step >= self.adapt_from and size > 0:  # (a step at lr 0 says nothing)
                    p = float(to_numpy(d.sum())) / size  # in [−1, 1]
                    span = math.log(ADAPT_RANGE)
                    self.log_coeff = min(self.log_coeff0 + span, max(self.log_coeff0 - span,
                                         self.log_coeff - ADAPT_RATE * (p - PUSH_TARGET)))
                total = float(to_numpy(w.sum()))
                if total > 0:  # Adam shapes the thresholds relative to each other, not L0 (to first order)
                    t -= float(to_numpy((w * d).sum())) / total
            move = self.gain * e + KI * self.integral
        if step < self.warmup:  # the L0 warm-up: its way on the calibration sample, a W-th a step
            move += self.ramp * (self.progress(step + 1) - self.progress(step))
        t += move  # (M,)
        self._set(params, t)
        self.prev = self.thresholds(params)
        return e

    def state(self):
        """What the checkpoint keeps (JSON: floats round-trip exactly)."""
        return {"format": STATE_FORMAT, "unit": self.unit, "integral": self.integral, "log_coeff": self.log_coeff,
                "ramp": self.ramp}


def threshold_param(cfg):
    """The parameter the controller moves for cfg."""
    if cfg.architecture == "gated":
        return "b_gate"
    return "log_threshold" if cfg.threshold_param == "log" else "threshold"


def make(cfg, params, state=None, sample=None):
    """The controller of a resolved TrainConfig, or None when cfg.uses_controller() is false.
    state: the checkpoint's controller state (a resumed run); else a fresh run, whose thresholds
    are calibrated in place from sample() (or sample itself): normalised inputs (n, D), the same
    on every rank (unless a JumpReLU threshold_init is given: θ starts there). Refuses a resumed
    run without state (sample None)."""
    if not cfg.uses_controller():
        return None
    kind = threshold_param(cfg)
    start = start_l0(cfg.target_l0, cfg.d_sae, cfg.l0_warmup_steps, cfg.architecture)
    adapt = "pi" if cfg.architecture == "gated" else (None if cfg.penalty == "quadratic" else "push")
    common = dict(gain=cfg.controller_gain, start=start, warmup=cfg.l0_warmup_steps, coeff0=cfg.sparsity_coeff,
                  adapt=adapt, adapt_from=cfg.sparsity_warmup_steps)
    if state is None and sample is None:
        raise CheckpointError("the checkpoint holds no L0 controller state for a run with target_l0: start it over")
    if state is not None:
        if not (isinstance(state, dict) and state.get("format") == STATE_FORMAT
                and all(isinstance(state.get(k), (int, float)) for k in ("unit", "integral", "log_coeff", "ramp"))):
            raise CheckpointError(f"the checkpoint's L0 controller state {state!r} is not {STATE_FORMAT!r} "
                                  "(written by an older minisae): start the run over")
        ctrl = L0Controller(cfg.target_l0, kind, unit=state["unit"], integral=state["integral"],
                            log_coeff=state["log_coeff"], ramp=state["ramp"], **common)
    elif cfg.architecture == "jumprelu" and cfg.threshold_init is not None:  # θ starts where it was told
        unit = 1.0 if kind == "log_threshold" else float(cfg.threshold_init)
        ctrl = L0Controller(cfg.target_l0, kind, unit=unit, **common)
    else:
        unit, shift = calibrate(cfg.architecture, params, sample() if callable(sample) else sample, cfg.target_l0,
                                floor=cfg.bandwidth, start=start if cfg.l0_warmup_steps else None)
        ctrl = L0Controller(cfg.target_l0, kind, unit=unit, ramp=shift, **common)
    ctrl.start(params)
    return ctrl


def calibrate(architecture, params, x, target, *, floor=0.001, start=None):
    """Set the thresholds of params in place from the n tokens of x (n, D) (normalised inputs).

    Each latent's level for the target: c = round(n·target/M) of the sample's tokens above it,
    JumpReLU θ*_i halfway between the (c+1)-th and the c-th largest π_i = ReLU(x_c·w_i + b_enc_i)
    (at least `floor`), Gated −b_gate*_i the same of the gate pre-activations x_c·w_i. Without
    `start` the thresholds are these. With an L0 `start` (the L0 warm-up's), every threshold is
    lowered by one shift s >= 0 in control units, t_i = t*_i − s, the smallest that makes the
    sample's L0 = start: the warm-up then raises them all by s and each latent ends at its own
    level for the target. Returns (unit, s): the controller's threshold unit (Gated σ, the standard
    deviation of the gate pre-activations over the sample; raw θ the mean of θ*; log θ 1) and s
    (0.0 without `start`)."""
    xp = xp_of(params["W_enc"])
    x = xp.asarray(x, dtype=params["W_enc"].dtype)  # (n, D)
    n, M = x.shape[0], params["W_enc"].shape[1]
    if n < 2:
        raise ValueError(f"calibrate: expected a sample of at least 2 tokens, found {n}")
    c = min(n - 1, max(1, int(round(n * float(target) / M))))
    x_c = x - params["b_dec"]  # (n, D)
    width = max(1, CALIBRATION_ENTRIES // n)

    def pre_acts(lo, hi):  # (n, m) JumpReLU π or Gated x_c·w of latents [lo, hi)
        pre = x_c @ params["W_enc"][:, lo:hi]  # (n, D) @ (D, m) -> (n, m)
        if architecture == "jumprelu":
            pre += params["b_enc"][lo:hi]
            xp.maximum(pre, 0.0, out=pre)
        return pre

    q = xp.empty(M, dtype=numpy.float64)  # (M,)
    s1 = s2 = 0.0
    for lo in range(0, M, width):
        hi = min(M, lo + width)
        pre = pre_acts(lo, hi)
        if architecture == "gated":
            s1 += float(to_numpy(pre.sum(dtype=numpy.float64)))
            s2 += float(to_numpy((pre.astype(numpy.float64) ** 2).sum()))
        part = xp.partition(pre, n - c - 1, axis=0)  # (n, m): the c largest last
        # halfway between the (c+1)-th and the c-th largest: exactly c entries above, with room
        # for the rounding of log θ
        q[lo:hi] = 0.5 * (part[n - c - 1].astype(numpy.float64) + part[n - c:].min(axis=0))  # (m,)
    if architecture == "gated":
        mean = s1 / (n * M)
        unit = math.sqrt(max(s2 / (n * M) - mean * mean, 0.0)) or 1.0
        level = q  # (M,) gate opens above it
    else:
        level = xp.maximum(q, float(floor))  # (M,) θ*
        unit = 1.0 if "log_threshold" in params else float(to_numpy(level.mean()))
    shift = 0.0
    k = int(round(n * float(start))) if start is not None else 0
    if 0 < k < n * M:
        # s: halfway between the k-th and (k+1)-th largest distance r = t(pre) − t*_i over all
        # (token, latent) entries, so exactly k entries (L0 = start) lie above t* − s
        top = xp.full(0, -math.inf)  # the largest k + 1 distances so far
        for lo in range(0, M, width):
            hi = min(M, lo + width)
            pre = pre_acts(lo, hi).astype(numpy.float64)  # (n, m)
            if architecture == "gated":
                r = (pre - level[lo:hi]) / unit
            elif "log_threshold" in params:
                with numpy.errstate(divide="ignore"):
                    r = xp.log(pre) - xp.log(level[lo:hi])  # π = 0: −inf, never above
            else:
                r = (pre - level[lo:hi]) / unit
            top = xp.concatenate([top, r.ravel()])
            if top.size > k + 1:
                top = xp.partition(top, top.size - k - 1)[top.size - k - 1:]  # (k + 1,) the largest
        top = xp.sort(top)  # (k + 1,) ascending: top[0] the (k+1)-th largest, top[1] the k-th
        if top.size == k + 1 and math.isfinite(float(to_numpy(top[1]))):
            low = float(to_numpy(top[0])) if math.isfinite(float(to_numpy(top[0]))) else float(to_numpy(top[1])) - 1.0
            shift = max(0.0, -0.5 * (low + float(to_numpy(top[1]))))
    if architecture == "gated":
        params["b_gate"][...] = -(level - shift * unit)  # (M,)
    elif "threshold" in params:
        params["threshold"][...] = xp.maximum(level - shift * unit, 0.0)
    else:
        params["log_threshold"][...] = xp.log(level) - shift
    return unit, shift
