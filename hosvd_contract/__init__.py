"""The bundle contract: the only thing the converter and the device app share.

This package imports neither TensorFlow nor paho-mqtt, so both halves can depend on it.
"""

from hosvd_contract.manifest import (
    FORMAT_VERSION,
    MANIFEST_FILE,
    MODEL_FILE,
    READABLE_FORMAT_VERSIONS,
    BundleError,
    InputSpec,
    LayerInfo,
    Manifest,
    MemoryPlanEntry,
    TrainSignature,
    WeightSpec,
    file_sha256,
    load_manifest,
)
from hosvd_contract.signatures import Sig

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST_FILE",
    "MODEL_FILE",
    "READABLE_FORMAT_VERSIONS",
    "BundleError",
    "InputSpec",
    "LayerInfo",
    "Manifest",
    "MemoryPlanEntry",
    "Sig",
    "TrainSignature",
    "WeightSpec",
    "file_sha256",
    "load_manifest",
]
