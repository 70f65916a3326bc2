"""``manifest.json``: what a bundle holds, written by the converter and trusted by the device once loaded.

A bundle is a directory with ``model.tflite`` and ``manifest.json``. :func:`load_manifest` validates the format
version and the sha256 of the model file, so the device refuses a tampered or mismatched bundle with a message
that says what is wrong.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

FORMAT_VERSION = 2
# Format 1 bundles had 0-d ``set_weights`` inputs (learning rate, step); the device still reads them except on
# aarch64 ai-edge-litert, which segfaults on them (``device_app.runtime.check_signature_inputs``).
READABLE_FORMAT_VERSIONS = (1, 2)
MODEL_FILE = "model.tflite"
MANIFEST_FILE = "manifest.json"

Task = Literal["classification", "regression"]
PlanMode = Literal["whole", "streamed"]


class BundleError(ValueError):
    """A bundle that cannot be used: missing files, wrong format version, hash mismatch, bad fields."""


@dataclass(frozen=True)
class InputSpec:
    """Per-sample model input.

    ``shape`` excludes the batch axis, e.g. ``[100, 6]`` for a 100-step, 6-channel sensor window (layout ``NLC``)
    or ``[8, 8, 1]`` for an image (``NHWC``). ``mean``/``std`` are applied by the device before the model
    (``(x - mean) / std``), broadcast over the last axis; ``None`` means the data is used as is.
    ``channels`` names the sensor axes of a window model in column order (e.g. ``["ax", "ay", "az"]``), and
    ``rate_hz`` the sampling rate the model was trained on.
    """

    shape: list[int]
    dtype: str = "float32"
    layout: str = "NHWC"
    mean: list[float] | None = None
    std: list[float] | None = None
    channels: list[str] | None = None
    rate_hz: float | None = None


@dataclass(frozen=True)
class WeightSpec:
    """One variable in ``get_weights``/``set_weights`` order.

    ``role`` is ``kernel``, ``bias``, ``depthwise_kernel``, ... for trainable weights, ``optimizer:<slot>`` for
    optimizer state (``optimizer:momentum``, ``optimizer:m``, ``optimizer:v``, ``optimizer:step``,
    ``optimizer:learning_rate``) and ``compression:<what>`` for compression state (``compression:basis_mode0``).
    ``layer`` is the Keras layer name (empty for optimizer hyper-parameters).
    """

    name: str
    layer: str
    role: str
    shape: list[int]
    dtype: str = "float32"

    @property
    def trainable(self) -> bool:
        return ":" not in self.role


@dataclass(frozen=True)
class LayerInfo:
    """A layer of the model as the converter planned it.

    ``saved_bytes_vanilla``/``saved_bytes_compressed`` follow the paper's analytic metric (float32, the
    activation saved for the weight gradient, at the default train batch); ``saved_bytes_compressed`` is what the
    bundle allocates, at the static ranks. ``saved_shape`` is that saved input (batch first). ``ranks`` are the
    maximum (static) ranks for ``hosvd``/``svd`` and the fixed ranks for ``asi``; ``calibrated_ranks`` are the
    ε-ranks measured on the calibration data. For ``asi``, ``epsilon`` is the ε this layer's ranks were chosen at
    and ``gradient_error`` the relative weight-gradient error those ranks cause on the calibration data (absent
    in older manifests). ``saved_bytes_masks`` are the bit-packed masks a ReLU/ReLU6 or max-pooling node keeps
    for its backward pass. ``note`` says why a layer is saved differently from the method asked for
    (uncompressed because the compressed form would not be smaller, ``--max-rank`` binding).
    """

    name: str
    type: str
    trainable: bool
    output_shape: list[int]
    compression: str | None = None
    epsilon: float | None = None
    ranks: list[int] | None = None
    calibrated_ranks: list[int] | None = None
    saved_bytes_vanilla: int = 0
    saved_bytes_compressed: int = 0
    gradient_error: float | None = None
    saved_shape: list[int] | None = None
    saved_bytes_masks: int = 0
    note: str | None = None


@dataclass(frozen=True)
class TrainSignature:
    """The train step for one static batch size."""

    batch_size: int
    train: str
    train_features: str


@dataclass(frozen=True)
class MemoryPlanEntry:
    """Estimated and measured memory of one way to run a train step.

    ``mode`` ``whole`` runs ``train`` on the whole batch; ``streamed`` runs ``features`` in micro-batches of
    ``micro_batch`` and then ``train_features``. ``measured_peak_rss_bytes`` is the peak RSS of a fresh child
    process that loaded the bundle and ran one step; ``measured_base_rss_bytes`` the same process right after
    loading, before any signature ran. The device plans with the difference. ``measured_anon_rss_bytes`` is the
    anonymous resident memory after the step (arena and heap; unlike pages of the mapped model file the kernel
    cannot reclaim it). ``vanilla_*`` are the same plan of the uncompressed (``none``) bundle of the same model,
    measured in the same conversion, for comparison.
    """

    batch_size: int
    mode: PlanMode
    micro_batch: int
    estimated_peak_bytes: int
    measured_peak_rss_bytes: int | None = None
    measured_base_rss_bytes: int | None = None
    runtime: str | None = None
    measured_anon_rss_bytes: int | None = None
    vanilla_peak_rss_bytes: int | None = None
    vanilla_anon_rss_bytes: int | None = None

    @property
    def measured_delta_bytes(self) -> int | None:
        if self.measured_peak_rss_bytes is None or self.measured_base_rss_bytes is None:
            return None
        return self.measured_peak_rss_bytes - self.measured_base_rss_bytes


@dataclass(frozen=True)
class Manifest:
    """Everything the device needs to know about a bundle (see ``docs/bundle.md``)."""

    format_version: int
    model_name: str
    sha256: str
    input: InputSpec
    features_shape: list[int]
    output_shape: list[int]
    task: Task
    loss: str
    labels: list[str]
    optimizer: dict[str, Any]
    compression: dict[str, Any]
    train_last: int
    train_signatures: list[TrainSignature]
    weights: list[WeightSpec]
    layers: list[LayerInfo]
    memory_plan: list[MemoryPlanEntry] = field(default_factory=list)
    op_census: dict[str, int] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    created: str = ""
    fit: dict[str, Any] | None = None  # the ``hosvd-convert fit`` search that chose train_last (docs/bundle.md)

    @property
    def eps_rule(self) -> str:
        """The ε rule the ranks were chosen with (``compression.eps_rule``): ``energy`` or ``centred``; bundles
        converted before the field existed used ``energy``."""
        return self.compression.get("eps_rule", "energy")

    @property
    def default_batch_size(self) -> int:
        return self.train_signatures[0].batch_size

    def train_signature(self, batch_size: int) -> TrainSignature:
        for sig in self.train_signatures:
            if sig.batch_size == batch_size:
                return sig
        have = [s.batch_size for s in self.train_signatures]
        raise BundleError(f"bundle has no train signature for batch size {batch_size}; it has {have}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        """Build a manifest from parsed JSON, naming the first missing or malformed field."""
        if not isinstance(data, dict):
            raise BundleError(f"manifest must be a JSON object, got {type(data).__name__}")
        version = data.get("format_version")
        if version not in READABLE_FORMAT_VERSIONS:
            raise BundleError(
                f"manifest format_version must be one of {list(READABLE_FORMAT_VERSIONS)} (this device app), "
                f"bundle has {version!r}: convert the model again with a matching hosvd-convert"
            )
        try:
            return cls(
                format_version=version,
                model_name=data["model_name"],
                sha256=data["sha256"],
                input=InputSpec(**data["input"]),
                features_shape=list(data["features_shape"]),
                output_shape=list(data["output_shape"]),
                task=data["task"],
                loss=data["loss"],
                labels=list(data["labels"]),
                optimizer=dict(data["optimizer"]),
                compression=dict(data["compression"]),
                train_last=int(data["train_last"]),
                train_signatures=[TrainSignature(**s) for s in data["train_signatures"]],
                weights=[WeightSpec(**w) for w in data["weights"]],
                layers=[LayerInfo(**info) for info in data["layers"]],
                memory_plan=[MemoryPlanEntry(**m) for m in data.get("memory_plan", [])],
                op_census=dict(data.get("op_census", {})),
                versions=dict(data.get("versions", {})),
                created=data.get("created", ""),
                fit=data.get("fit"),
            )
        except KeyError as err:
            raise BundleError(f"manifest is missing field {err.args[0]!r}") from err
        except TypeError as err:
            raise BundleError(f"manifest has a malformed entry: {err}") from err


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_manifest(bundle_dir: str | os.PathLike[str], verify_hash: bool = True) -> Manifest:
    """Read and validate ``bundle_dir/manifest.json``.

    Args:
        bundle_dir: the bundle directory.
        verify_hash: check that ``model.tflite`` has the sha256 recorded in the manifest.

    Returns:
        The parsed manifest.

    Raises:
        BundleError: missing files, unreadable JSON, wrong format version, hash mismatch.
    """
    bundle = Path(bundle_dir)
    manifest_path = bundle / MANIFEST_FILE
    model_path = bundle / MODEL_FILE
    for path in (manifest_path, model_path):
        if not path.is_file():
            raise BundleError(f"bundle {bundle} has no {path.name}")
    try:
        data = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as err:
        raise BundleError(f"{manifest_path} is not valid JSON: {err}") from err
    manifest = Manifest.from_dict(data)
    if verify_hash:
        actual = file_sha256(model_path)
        if actual != manifest.sha256:
            raise BundleError(
                f"{model_path} has sha256 {actual[:12]}…, the manifest expects {manifest.sha256[:12]}…: "
                "the bundle is corrupt or was modified; push it again"
            )
    return manifest
