"""What crosses the network in a fleet round: a bundle's trainable weights, by manifest name, and nothing else.

No optimizer slots, no compression state, no frozen prefix, no window. Both sides check what they receive
against the bundle's manifest, so a node with another bundle (or a server that sends something else) gets an
error that names the mismatch instead of a silently wrong average.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from device_app.checkpoint import write_npz
from hosvd_contract import BundleError, Manifest

Arrays = dict[str, np.ndarray]


def trainable_specs(manifest: Manifest) -> dict[str, tuple[list[int], str]]:
    """``{name: (shape, dtype)}`` of the bundle's trainable weights, in ``get_weights`` order."""
    return {w.name: (list(w.shape), w.dtype) for w in manifest.weights if w.trainable}


def trainable(manifest: Manifest, weights: Arrays) -> Arrays:
    """The trainable weights out of a full set (a checkpoint's, or ``get_weights``'s)."""
    return {name: np.asarray(weights[name]) for name in trainable_specs(manifest)}


def check(manifest: Manifest, arrays: Arrays, what: str) -> Arrays:
    """Return ``arrays`` as float arrays in the manifest's dtypes if they are exactly the trainable weights.

    Raises:
        BundleError: a missing, extra or misshapen array (the message names each, and the bundle).
    """
    specs = trainable_specs(manifest)
    missing, extra = sorted(set(specs) - set(arrays)), sorted(set(arrays) - set(specs))
    if missing or extra:
        raise BundleError(f"{what} does not match the trainable weights of bundle {manifest.model_name} "
                          f"({manifest.sha256[:12]}…): missing {missing}, not trainable or unknown {extra}")
    bad = [f"{k}: {list(np.shape(v))}, bundle {specs[k][0]}" for k, v in arrays.items()
           if list(np.shape(v)) != specs[k][0]]
    if bad:
        raise BundleError(f"{what} has arrays of the wrong shape for bundle {manifest.model_name}: {bad}")
    return {k: np.asarray(arrays[k], dtype=specs[k][1]) for k in specs}


def save_npz(path: str | os.PathLike[str], arrays: Arrays) -> Path:
    """Write ``arrays`` to ``path`` atomically (temp file, fsync, rename)."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    write_npz(final, arrays)
    return final


def nbytes(arrays: Arrays) -> int:
    """Payload bytes of ``arrays`` (what one direction of a round carries, before framing)."""
    return int(sum(np.asarray(a).nbytes for a in arrays.values()))
