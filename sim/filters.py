"""Low-pass filters for smoothing motor targets, as DayDreamer did on the A1.

A policy sampled at 20 Hz can ask for a new joint target every step; sent straight to the motors,
that is a train of steps which excites vibration and wears real gearboxes. A 2nd-order Butterworth
at a low cutoff (1.5 Hz) keeps the commanded motion smooth while passing slow, deliberate moves.

The coefficients come from the analog prototype H(s) = wc^2 / (s^2 + sqrt(2) wc s + wc^2) through
the bilinear transform s = 2 fs (z - 1) / (z + 1), with the cutoff pre-warped so that the digital
filter has exactly -3 dB at `cutoff_hz` (the same convention as `scipy.signal.butter`).
"""

from __future__ import annotations

import math

import numpy as np


def butter2_lowpass(cutoff_hz: float, sample_hz: float) -> tuple[np.ndarray, np.ndarray]:
    """Numerator `b` (3) and denominator `a` (3, a[0] = 1) of a digital 2nd-order Butterworth low-pass."""
    if not 0 < cutoff_hz < sample_hz / 2:
        raise ValueError(
            f"low-pass cutoff {cutoff_hz} Hz must lie in (0, {sample_hz / 2}) Hz, below the Nyquist rate "
            f"of the {sample_hz} Hz sample rate"
        )
    k = math.tan(math.pi * cutoff_hz / sample_hz)  # pre-warped cutoff, in units of 2 * fs
    norm = 1.0 + math.sqrt(2.0) * k + k * k
    b0 = k * k / norm
    b = np.array([b0, 2.0 * b0, b0])
    a = np.array([1.0, 2.0 * (k * k - 1.0) / norm, (1.0 - math.sqrt(2.0) * k + k * k) / norm])
    return b, a


class LowPassFilter:
    """A vector 2nd-order Butterworth low-pass in direct form I, one channel per element.

    `reset(x)` fills the history with `x`, so a constant input passes unchanged from the first call
    (no start-up transient). Without a cutoff (`cutoff_hz=None`) it is the identity.
    """

    def __init__(self, cutoff_hz: float | None, sample_hz: float, size: int) -> None:
        self.enabled = cutoff_hz is not None
        self.b, self.a = butter2_lowpass(cutoff_hz, sample_hz) if cutoff_hz is not None else (None, None)
        self.size = size
        self._x = np.zeros((2, size))  # previous two inputs, newest first
        self._y = np.zeros((2, size))  # previous two outputs, newest first

    def reset(self, value: np.ndarray) -> None:
        """Start at rest at `value`: the output equals `value` until the input changes."""
        value = np.broadcast_to(np.asarray(value, dtype=np.float64), (self.size,))
        self._x[:] = value
        self._y[:] = value

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """Filter one sample (a vector of `size` channels) and return the output."""
        x = np.asarray(x, dtype=np.float64)
        if x.shape != (self.size,):
            raise ValueError(f"filter input has shape {x.shape}, expected ({self.size},)")
        if not self.enabled:
            return x.copy()
        b, a = self.b, self.a
        y = b[0] * x + b[1] * self._x[0] + b[2] * self._x[1] - a[1] * self._y[0] - a[2] * self._y[1]
        self._x[1] = self._x[0]
        self._x[0] = x
        self._y[1] = self._y[0]
        self._y[0] = y
        return y.copy()

    def state(self) -> np.ndarray:
        """Internal history (inputs and outputs), for saving and comparing."""
        return np.concatenate([self._x, self._y]).copy()
