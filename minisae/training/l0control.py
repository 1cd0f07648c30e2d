"""Training to an exact target L0: thresholds calibrated from the data at the start, then moved
every step by a controller outside Adam (minisae train --target-l0; JumpReLU and Gated).

Legend: B tokens in a batch, M latents, n tokens in the calibration sample. t_i is latent i's
threshold in control units: JumpReLU log θ_i (the paper's parameter), or θ_i / u (raw θ, u the
mean calibrated θ); Gated −b_gate_i / σ (its gate opens where x_c·w_i > −b_gate_i; σ the spread
of x_c·w over the calibration sample). L0* is the target, L0_t the L0 of step t's batch
(measured in the step's forward pass), f_i the number of the batch's tokens latent i fired on.

Why λ cannot do it (docs/derivations/l0_controller.md): Adam moves a parameter by about
lr·m/√v per step, and m/√v ≈ ±1 for a gradient of steady sign whatever its size, so raising λ
cannot move θ faster than lr per step: at JumpReLU's lr 7e-5, log θ needs ~70,000 steps to travel
from Gemma Scope's θ = 0.001 to where the pre-activations are. λ sets the direction of Adam's
push on θ, not its speed.

1. Calibration (a fresh run, batch 0): θ_i = halfway between the (c+1)-th and the c-th largest
   π_i of the sample, c = round(n·L0*/M) (Gated: b_gate_i = minus that of x_c·w_i), so each latent
   fires on the fraction L0*/M of the sample and the SAE starts at L0 ≈ L0*.
2. Control, after every optimiser step, with
       e_t = clip(log((L0_t + 0.1) / (L0* + 0.1)), −1, 1),   I_t = clip(I_{t−1} + e_t, −100, 100)
       w_i = f_i + 0.1·mean(f)                  (the latents that fire move most: their
                                                 thresholds are the ones L0 depends on)
   JumpReLU (λ stays at its configured value): Adam's step Δt (the controller keeps t as it left
       it) loses its component along w, Δt <- Δt − w (w·Δt)/(w·w), so Adam's θ updates cannot
       move L0 to first order (they still shape θ across latents); then
       t_i <- t_i + (0.02·e_t + 0.001·I_t) · min(w_i / mean(w), 4)
   Gated: λ moves, log λ = log λ_0 + 0.5·e_t + 0.02·I_t: λ sets the balance of Adam's push on
       W_enc and b_gate through the L1 term, which at a high lr moves the gates faster than the
       controller's own move could; with the calibrated start λ only has to hold L0, not move it
       far. At a low lr, where Adam moves b_gate too slowly, the proportional move
       t_i <- t_i + 0.02·e_t · min(w_i / mean(w), 4) holds L0.

The gains do not scale with lr, so the final lr decay does not freeze the controller. Its state is
three floats (I, the unit u or σ, and Gated's log λ), all bounded: |I| <= 100 so λ stays within a
factor 12.2 of λ_0; the t it left is the parameters themselves (the checkpoint holds them). It
reads one number and one (M,) count per step (under data parallelism both summed over ranks), so
it is rank-independent; a resumed run repeats the uninterrupted one bit for bit.

Limits: a raw θ projected to 0 stays where Adam puts it (the move is clamped at 0 too); if the
weights change L0 faster than the gains allow (the first tens of steps at lr 1e-2), L0 lags the
target meanwhile; a latent whose sample never exceeds 0 starts at θ = bandwidth.
"""

import math

import numpy

from minisae.errors import CheckpointError
from minisae.xp import to_numpy, xp_of

DEFAULT_GAIN = 0.02     # proportional gain: the control move per unit of error (threshold units)
KI = 0.001              # JumpReLU: integral gain
INTEGRAL_MAX = 100.0    # |integral| ≤ this (JumpReLU: the integral's move is at most KI · INTEGRAL_MAX = 0.1 per step)
ERROR_CLIP = 1.0        # |e_t| ≤ this (log L0 units)
L0_OFFSET = 0.1         # keeps log L0 finite when a batch has no active latent
FIRED_FLOOR = 0.1       # weights w_i = fired_i + this × mean fired: a silent latent still moves a little
WEIGHT_MAX = 4.0        # no latent's control move is more than this × the mean move
STATE_FORMAT = "minisae-l0-controller-2"
CALIBRATION_ENTRIES = 1 << 24  # most (tokens × latents) pre-activations held at once while calibrating
KINDS = ("log_threshold", "threshold", "b_gate")
COEFF_KP, COEFF_KI = 0.5, 0.02  # Gated: log λ = log λ_0 + COEFF_KP·e + COEFF_KI·integral
COEFF_RANGE = math.exp(COEFF_KP * ERROR_CLIP + COEFF_KI * INTEGRAL_MAX)  # λ stays in [λ_0 / 12.2, λ_0 × 12.2]


class L0Controller:
    """Moves the thresholds toward `target` L0 after every optimiser step (the module docstring).
    kind: the parameter moved ("log_threshold", "threshold" or "b_gate"); unit: the threshold unit
    of "threshold" and "b_gate" (set by the calibration); integral: the bounded integral."""

    def __init__(self, target, kind, *, gain=DEFAULT_GAIN, unit=1.0, integral=0.0, coeff0=None, log_coeff=None):
        if not target > 0 or kind not in KINDS:
            raise ValueError(f"L0Controller: expected target > 0 and one of {KINDS}, found {target}, {kind!r}")
        if not (gain > 0 and math.isfinite(gain) and unit > 0 and math.isfinite(unit)
                and abs(integral) <= INTEGRAL_MAX):
            raise ValueError(f"L0Controller: expected gain > 0, unit > 0 and |integral| <= {INTEGRAL_MAX}, "
                             f"found {gain}, {unit}, {integral}")
        self.target, self.kind, self.gain = float(target), kind, float(gain)
        self.unit, self.integral = float(unit), float(integral)
        self.prev = None  # (M,) float64 thresholds t after the last correction (= the parameters then)
        # Gated: λ too (log λ, bounded); None: λ stays at the configured value
        self.log_coeff0 = None if coeff0 is None else math.log(float(coeff0))
        self.log_coeff = self.log_coeff0 if log_coeff is None else float(log_coeff)
        if self.log_coeff0 is not None and not abs(self.log_coeff - self.log_coeff0) <= math.log(COEFF_RANGE) + 1e-9:
            raise ValueError(f"L0Controller: λ = exp({log_coeff}) outside [λ0 / {COEFF_RANGE}, λ0 × {COEFF_RANGE}]")

    def coeff(self):
        """λ for the next step: the configured value (None) or, Gated, the controller's."""
        return None if self.log_coeff is None else math.exp(self.log_coeff)

    def error(self, l0):
        """e = clip(log((L0 + 0.1) / (L0* + 0.1)), −1, 1) for a batch L0 (a float)."""
        e = math.log((float(l0) + L0_OFFSET) / (self.target + L0_OFFSET))
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

    def after_step(self, params, l0, fired):
        """After a step's optimiser update, in place: l0 the batch L0 of the step's forward pass
        (before the update), fired (M,) on how many of the batch's tokens each latent fired.
        Returns e."""
        e = self.error(l0)
        self.integral = min(INTEGRAL_MAX, max(-INTEGRAL_MAX, self.integral + e))
        t = self.thresholds(params)  # (M,)
        xp = xp_of(t)
        w = xp.asarray(fired, dtype=numpy.float64)  # (M,)
        w += FIRED_FLOOR * float(to_numpy(w.mean())) + 1e-12  # (M,) > 0
        if self.log_coeff is not None:  # Gated: λ by PI, the thresholds by the proportional move
            self.log_coeff = self.log_coeff0 + COEFF_KP * e + COEFF_KI * self.integral
            move = self.gain * e
        else:  # JumpReLU: Adam's move loses its component along w (the one that moves L0)
            if self.prev is not None:
                d = t - self.prev  # (M,)
                t -= w * (float(to_numpy((w * d).sum())) / float(to_numpy((w * w).sum())))
            move = self.gain * e + KI * self.integral
        t += move * xp.minimum(w / w.mean(), WEIGHT_MAX)  # (M,)
        self._set(params, t)
        self.prev = self.thresholds(params)
        return e

    def state(self):
        """What the checkpoint keeps (JSON: floats round-trip exactly)."""
        return {"format": STATE_FORMAT, "unit": self.unit, "integral": self.integral, "log_coeff": self.log_coeff}


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
    coeff0 = cfg.sparsity_coeff if cfg.architecture == "gated" else None
    if state is None and sample is None:
        raise CheckpointError("the checkpoint holds no L0 controller state for a run with target_l0: start it over")
    if state is not None:
        if not (isinstance(state, dict) and state.get("format") == STATE_FORMAT
                and all(isinstance(state.get(k), (int, float)) for k in ("unit", "integral"))):
                raise CheckpointError(f"the checkpoint's L0 controller state {state!r} is not {STATE_FORMAT!r} "
                                  "(written by an older minisae): start the run over")
        ctrl = L0Controller(cfg.target_l0, kind, gain=cfg.controller_gain, unit=state["unit"],
                            integral=state["integral"], coeff0=coeff0, log_coeff=state.get("log_coeff"))
    elif cfg.architecture == "jumprelu" and cfg.threshold_init is not None:  # θ starts where it was told
        unit = 1.0 if kind == "log_threshold" else float(cfg.threshold_init)
        ctrl = L0Controller(cfg.target_l0, kind, gain=cfg.controller_gain, unit=unit, coeff0=coeff0)
    else:
        unit = calibrate(cfg.architecture, params, sample() if callable(sample) else sample, cfg.target_l0,
                         floor=cfg.bandwidth)
        ctrl = L0Controller(cfg.target_l0, kind, gain=cfg.controller_gain, unit=unit, coeff0=coeff0)
    ctrl.start(params)
    return ctrl


def calibrate(architecture, params, x, target, *, floor=0.001):
    """Set the thresholds of params in place so that each latent fires on c = round(n·target/M)
    of the n tokens of x (n, D) (normalised inputs): JumpReLU θ_i (log or raw) = halfway between
    the (c+1)-th and the c-th largest π_i = ReLU(x_c·w_i + b_enc_i) of the sample (at least
    `floor`); Gated b_gate_i = minus that of the gate pre-activations x_c·w_i. Returns the controller's threshold unit:
    Gated σ, the standard deviation of the gate pre-activations over the sample; raw θ the mean
    calibrated θ; log θ 1."""
    xp = xp_of(params["W_enc"])
    x = xp.asarray(x, dtype=params["W_enc"].dtype)  # (n, D)
    n, M = x.shape[0], params["W_enc"].shape[1]
    if n < 2:
        raise ValueError(f"calibrate: expected a sample of at least 2 tokens, found {n}")
    c = min(n - 1, max(1, int(round(n * float(target) / M))))
    x_c = x - params["b_dec"]  # (n, D)
    q = xp.empty(M, dtype=numpy.float64)  # (M,)
    s1 = s2 = 0.0
    width = max(1, CALIBRATION_ENTRIES // n)
    for lo in range(0, M, width):
        hi = min(M, lo + width)
        pre = x_c @ params["W_enc"][:, lo:hi]  # (n, D) @ (D, m) -> (n, m)
        if architecture == "jumprelu":
            pre += params["b_enc"][lo:hi]
            xp.maximum(pre, 0.0, out=pre)  # π (n, m)
        else:
            s1 += float(to_numpy(pre.sum(dtype=numpy.float64)))
            s2 += float(to_numpy((pre.astype(numpy.float64) ** 2).sum()))
        part = xp.partition(pre, n - c - 1, axis=0)  # (n, m): the c largest last
        # halfway between the (c+1)-th and the c-th largest: exactly c entries above, with room
        # for the rounding of log θ
        q[lo:hi] = 0.5 * (part[n - c - 1].astype(numpy.float64) + part[n - c:].min(axis=0))  # (m,)
    if architecture == "gated":
        mean = s1 / (n * M)
        sigma = math.sqrt(max(s2 / (n * M) - mean * mean, 0.0)) or 1.0
        params["b_gate"][...] = -q  # (M,)
        return sigma
    theta = xp.maximum(q, float(floor))  # (M,)
    if "threshold" in params:
        params["threshold"][...] = theta
        return float(to_numpy(theta.mean()))
    params["log_threshold"][...] = xp.log(theta)
    return 1.0
