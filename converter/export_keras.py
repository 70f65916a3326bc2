"""Write device-trained weights back into the Keras model: the round trip from the field to the workstation."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from converter.convert import SOURCE_MODEL, load_model
from converter.errors import ConversionError
from hosvd_contract import load_manifest

_KERAS_ATTR = {"kernel": "kernel", "bias": "bias", "depthwise_kernel": "kernel"}


def export_keras(bundle_dir: str | os.PathLike, weights_file: str | os.PathLike, out: str | os.PathLike,
                 model_path: str | os.PathLike | None = None) -> list[str]:
    """Load the bundle's Keras model, overwrite its trained weights from ``weights_file``, save to ``out``.

    Args:
        bundle_dir: the bundle the weights were trained with.
        weights_file: an ``.npz`` keyed by the manifest's weight names (a device checkpoint works as is).
        out: the ``.keras`` file to write.
        model_path: the original model, if the bundle does not hold ``source.keras``.

    Returns:
        The ``layer/role`` pairs that were written.

    Raises:
        ConversionError: a missing model, or a weights file that lacks a trained weight or has a wrong shape.
    """
    manifest = load_manifest(bundle_dir)
    source = Path(model_path) if model_path else Path(bundle_dir) / SOURCE_MODEL
    if not source.exists():
        raise ConversionError(f"no Keras model to write into: {source} does not exist; pass --model ORIGINAL.keras")
    model = load_model(source)
    with np.load(weights_file) as data:
        values = {key: data[key] for key in data.files}
    written = []
    for spec in manifest.weights:
        if not spec.trainable:
            continue
        if spec.name not in values:
            raise ConversionError(f"{weights_file} has no array {spec.name!r} (layer {spec.layer}, {spec.role})")
        value = values[spec.name]
        if list(value.shape) != spec.shape:
            raise ConversionError(f"{weights_file}: {spec.name!r} has shape {list(value.shape)}, the bundle says "
                                  f"{spec.shape}")
        getattr(model.get_layer(spec.layer), _KERAS_ATTR[spec.role]).assign(value.astype(np.float32))
        written.append(f"{spec.layer}/{spec.role}")
    model.save(out)
    return written
