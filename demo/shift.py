"""The simulated "new user": a change the factory model never saw, applied to the new user's recordings.

- Sensor windows (BasicMotions): the watch sits differently on the new user's wrist. Both 3-axis sensors
  (accelerometer and gyroscope) are rotated by the same angle about the watch's z axis (the axis through the
  watch face), which mixes the x and y readings the factory model learnt to tell activities apart by.
- Images (digits): the new user writes off-centre and with a heavier pen: every image is shifted by one pixel
  right and down and its ink is darkened (gamma), the drift a different pen and writing habit produce.
- Speech (JapaneseVowels, LPC cepstra): the new device's microphone path has another frequency response. A
  linear filter multiplies the spectrum, so it adds its own cepstrum to every frame; a first-order
  pre-emphasis ``1 − a z⁻¹`` adds ``c_n = −aⁿ / n`` to coefficient ``n`` (:func:`microphone_tilt`).
- Appliance current (PLAID, log-compressed): the new house's current clamp reads ``gain`` times the current
  (a clamp rated 10× higher reads a tenth), applied in amperes and compressed again (:func:`clamp_gain`).

Both are deterministic functions of the data, so the factory split stays untouched and the demo is repeatable.
"""

from __future__ import annotations

import numpy as np

DEFAULT_ROTATION_DEG = 90.0


def rotation_z(degrees: float) -> np.ndarray:
    """The 3×3 rotation matrix about z by ``degrees`` (counter-clockwise looking down z)."""
    a = np.deg2rad(degrees)
    c, s = np.cos(a), np.sin(a)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]], dtype=np.float32)


def rotate_triads(x: np.ndarray, degrees: float = DEFAULT_ROTATION_DEG) -> np.ndarray:
    """Rotate every consecutive 3-axis group of channels about z, as a watch turned on the wrist would see.

    Args:
        x: sensor windows ``(N, L, C)`` with ``C`` a multiple of 3 (``accX, accY, accZ, gyrX, gyrY, gyrZ``).
        degrees: rotation angle.

    Returns:
        float32 windows ``(N, L, C)``.

    Raises:
        ValueError: a channel count that is not a multiple of 3.
    """
    if x.shape[-1] % 3:
        raise ValueError(f"rotate_triads needs 3-axis channel groups, got {x.shape[-1]} channels")
    rot = rotation_z(degrees)
    groups = x.reshape(*x.shape[:-1], -1, 3)
    return np.einsum("...gj,ij->...gi", groups, rot).reshape(x.shape).astype(np.float32)


def shift_and_darken(x: np.ndarray, pixels: int = 1, gamma: float = 0.5) -> np.ndarray:
    """Shift images right and down by ``pixels`` (zero fill) and darken the ink by ``v ** gamma``.

    Args:
        x: images ``(N, H, W, C)`` in ``[0, 1]``.
        pixels: shift along both axes.
        gamma: ink curve; below 1 makes faint strokes stronger.

    Returns:
        float32 images ``(N, H, W, C)`` in ``[0, 1]``.
    """
    out = np.zeros_like(x, dtype=np.float32)
    out[:, pixels:, pixels:, :] = x[:, : x.shape[1] - pixels, : x.shape[2] - pixels, :]
    return np.power(out, gamma, dtype=np.float32)


def microphone_tilt(x: np.ndarray, a: float = 0.9) -> np.ndarray:
    """Add the cepstrum of a pre-emphasis filter ``1 − a z⁻¹`` to LPC cepstra ``(N, L, C)``: ``c_n −= aⁿ / n``.

    Returns:
        float32 ``(N, L, C)``.
    """
    n = np.arange(1, x.shape[-1] + 1, dtype=np.float64)
    return (x - a**n / n).astype(np.float32)


def clamp_gain(x: np.ndarray, gain: float = 0.1) -> np.ndarray:
    """Scale log-compressed currents (:func:`demo.datasets.log_compress`) by ``gain`` in amperes and compress
    them again.

    Returns:
        float32, the shape of ``x``.
    """
    from demo.datasets import log_compress, log_expand

    return log_compress(gain * log_expand(x))


SHIFTS = {"basicmotions": rotate_triads, "digits": shift_and_darken, "japanesevowels": microphone_tilt,
          "plaid": clamp_gain}
