"""A controller that trains an SAE to an exact target L0 by adjusting its sparsity coefficient λ.

JumpReLU (with the paper's L0 penalty, arXiv 2407.14435) and Gated SAEs (L1 penalty, arXiv
2404.16014) reach an L0 that depends on λ in a way known only after training, so comparing them
at "the same L0" used to mean interpolating between sweep points. With a target L0* the training
loop instead lets this controller set λ every step (minisae train --target-l0):

    e_t      = clip(log((L0_t + 0.1) / (L0* + 0.1)), -1, 1)     L0_t: the training batch's L0
    I_t      = I_{t-1} + e_t
    log λ_t+1 = log λ_0 + kp · e_t + ki · I_t                    (proportional-integral)

λ_0 is the given sparsity coefficient (the starting guess). The error is measured in log L0, so
a run twice too dense and one twice too sparse pull equally hard; clipping bounds the change of
log λ to about ki per step (ki = 0.01: a factor e in 100 steps at most), the proportional term
damps the overshoot that the lag between λ and L0 (the encoder must adapt) would otherwise give.
The integral term removes any steady-state offset, so the running L0 settles on L0*. While the
sparsity warm-up lasts (λ ramps linearly from 0) the controller is idle and I stays 0: the
warm-up's L0 is high by design and would otherwise wind the integral up.

The state is two Python floats (I and the last e), saved in the training checkpoint, and the
update reads nothing but the step's batch L0, so a resumed run repeats the uninterrupted one
bit for bit (tests/test_train.py). This is minisae's own design (a textbook PI controller on
log λ); the papers tune λ by hand.
"""

import math

DEFAULT_KP = 0.5  # proportional gain on the log-L0 error
DEFAULT_KI = 0.02  # integral gain per step
ERROR_CLIP = 1.0
L0_OFFSET = 0.1  # keeps log L0 finite when a batch has no active latent


class L0Controller:
    """PI control of log λ toward `target` L0 (see the module docstring)."""

    def __init__(self, target, coeff0, *, kp=DEFAULT_KP, ki=DEFAULT_KI, start_step=0, state=None):
        if not (target > 0 and coeff0 > 0):
            raise ValueError(f"L0Controller: expected target > 0 and a starting λ > 0, found {target}, {coeff0}")
        self.target, self.log_coeff0 = float(target), math.log(float(coeff0))
        self.kp, self.ki, self.start_step = float(kp), float(ki), int(start_step)
        self.integral, self.error = (0.0, 0.0) if state is None else (float(state["integral"]), float(state["error"]))

    def coeff(self):
        """λ for the next step."""
        return math.exp(self.log_coeff0 + self.kp * self.error + self.ki * self.integral)

    def update(self, step, l0):
        """Feed the L0 measured on the batch of `step` (a Python float)."""
        if step < self.start_step:
            return
        e = math.log((float(l0) + L0_OFFSET) / (self.target + L0_OFFSET))
        self.error = min(ERROR_CLIP, max(-ERROR_CLIP, e))
        self.integral += self.error

    def state(self):
        """What the checkpoint keeps: {"integral", "error"} (floats; JSON round-trips them exactly)."""
        return {"integral": self.integral, "error": self.error}
