"""A loaded bundle: the manifest plus one interpreter whose signatures share the model's variables, and a short-lived
second one for the frozen prefix (``features``).

Relies on the manifest fields ``input`` (shape, mean/std normalisation), ``labels``, ``train_signatures``,
``weights`` (names and roles in ``get_weights``/``set_weights`` order) and on the signature names of
:class:`hosvd_contract.Sig`. Only training/evaluation child processes create a :class:`Bundle`: the first
invoke allocates the interpreter arena, and that memory is never given back.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from device_app.memory import trim_heap
from device_app.runtime import check_signature_inputs, load_interpreter
from hosvd_contract import MODEL_FILE, BundleError, Manifest, Sig, load_manifest

EVAL_BATCH = 64
PREFIX_CHUNK_BYTES = 2 << 20
"""Raw windows (float32) held at once while the prefix computes features ahead of training: the whole batch of
32 images at 224² (18.4 MiB) was the largest thing alive in that phase, above the train step's own peak."""


class InputError(ValueError):
    """Data that does not fit the bundle (window shape, label type); the message names both shapes."""


def normalise(x: np.ndarray, manifest: Manifest) -> np.ndarray:
    """``(x - mean) / std`` over the last axis when the manifest gives them, as float32."""
    x = np.asarray(x, dtype=np.float32)
    if manifest.input.mean is not None:
        x = x - np.asarray(manifest.input.mean, np.float32)
    if manifest.input.std is not None:
        x = x / np.asarray(manifest.input.std, np.float32)
    return x


def mode_signatures(manifest: Manifest, mode: str) -> list[str]:
    """The main interpreter's signatures a plan mode trains and evaluates with (``features`` runs apart).

    Raises:
        ValueError: unknown ``mode``.
    """
    if mode == "whole":
        return [s.train for s in manifest.train_signatures] + [Sig.EVALUATE, Sig.GET_WEIGHTS, Sig.SET_WEIGHTS]
    if mode == "streamed":
        return ([s.train_features for s in manifest.train_signatures]
                + [Sig.EVALUATE_FEATURES, Sig.GET_WEIGHTS, Sig.SET_WEIGHTS])
    raise ValueError(f"unknown plan mode {mode!r}; expected whole or streamed")


class Bundle:
    """Signatures of one bundle as numpy functions.

    ``features`` runs in an interpreter of its own (XNNPACK for the prefix only), created for each call and freed
    before it returns: the prefix's packed weights and arena never coexist with a train step's arena
    (docs/bench.md, "What the device runtime holds"). The prefix has no variables, so nothing is lost.

    Args:
        path: the bundle directory (``manifest.json`` + ``model.tflite``); the hash is verified.
        num_threads: interpreter threads.
        mode: the plan mode (``whole`` or ``streamed``, :mod:`device_app.steps`) this process trains and
            evaluates with: only the signatures it runs (:func:`mode_signatures`) are delegated to XNNPACK on
            the main interpreter, op by op (``fuse=False`` of :func:`~device_app.runtime.load_interpreter`); the
            others still run, more slowly. ``None`` delegates all, with XNNPACK's fused partitions, as before.

    Raises:
        BundleError: invalid bundle, or a signature/weight the manifest names is missing from the model.
    """

    def __init__(self, path: str | os.PathLike[str], num_threads: int = 2, mode: str | None = None) -> None:
        self.path = Path(path)
        self.num_threads = num_threads
        self.manifest = load_manifest(self.path)
        delegated = None if mode is None else mode_signatures(self.manifest, mode)
        self.interpreter = load_interpreter(self.path / MODEL_FILE, num_threads, delegated, fuse=mode is None)
        self.signatures = self.interpreter.get_signature_list()
        self._runners: dict[str, Any] = {}
        self._label_dtypes: dict[str, np.dtype] = {}
        self._check()
        check_signature_inputs(self.interpreter, str(self.path))

    def _check(self) -> None:
        need = [Sig.INFER, Sig.EVALUATE, Sig.GET_WEIGHTS, Sig.SET_WEIGHTS]
        need += [s.train for s in self.manifest.train_signatures]
        missing = [k for k in need if k not in self.signatures]
        if missing:
            raise BundleError(f"{self.path}: model.tflite lacks signatures {missing}; it has "
                              f"{sorted(self.signatures)}")
        names = {w.name for w in self.manifest.weights}
        outputs = set(self.signatures[Sig.GET_WEIGHTS]["outputs"])
        if names != outputs:
            raise BundleError(f"{self.path}: manifest weights {sorted(names ^ outputs)} do not match "
                              "get_weights")

    @property
    def sha256(self) -> str:
        return self.manifest.sha256

    @property
    def has_features(self) -> bool:
        """True when the prefix can be streamed and cached (``features`` + ``train_features`` exist)."""
        return Sig.FEATURES in self.signatures and all(
            s.train_features in self.signatures for s in self.manifest.train_signatures)

    def runner(self, key: str) -> Any:
        """The runtime's signature runner for ``key`` (created once)."""
        if key not in self._runners:
            self._runners[key] = self.interpreter.get_signature_runner(key)
        return self._runners[key]

    def _labels(self, key: str, y: np.ndarray) -> np.ndarray:
        """``y`` in the dtype signature ``key`` takes (int32 class indices, or float32 regression targets)."""
        if key not in self._label_dtypes:
            self._label_dtypes[key] = self.runner(key).get_input_details()[Sig.Y]["dtype"]
        dtype = self._label_dtypes[key]
        y = np.asarray(y)
        integral = np.issubdtype(y.dtype, np.integer) or bool(np.all(np.mod(y, 1) == 0))
        if np.issubdtype(dtype, np.integer) and not integral:
            raise InputError(f"{key}: labels must be class indices, got non-integer values of {y.dtype}")
        return y.astype(dtype, copy=False)

    def _check_shape(self, key: str, x: np.ndarray, from_features: bool) -> None:
        want = self.manifest.features_shape if from_features else self.manifest.input.shape
        what = "prefix features" if from_features else "windows"
        if x.ndim < 1 or list(x.shape[1:]) != list(want):
            raise InputError(f"{key}: {what} of shape {list(x.shape[1:])} (batch {list(x.shape)}), the bundle's "
                             f"{'features_shape' if from_features else 'input shape'} is {list(want)}")

    def _batched(self, key: str, inputs: dict[str, np.ndarray], batch: int) -> list[dict[str, np.ndarray]]:
        n = len(next(iter(inputs.values())))
        run = self.runner(key)
        outs = []
        for i in range(0, n, batch):
            out = run(**{name: a[i:i + batch] for name, a in inputs.items()})
            outs.append({k: np.array(v) for k, v in out.items()})
        return outs

    def features(self, x: np.ndarray, micro_batch: int) -> np.ndarray:
        """Frozen-prefix output for raw windows ``x``, computed ``micro_batch`` samples at a time.

        Raises:
            InputError: ``x`` is not ``(N, *manifest.input.shape)``.
        """
        with self.prefix(micro_batch) as run:
            return run(x)

    def prefix_chunk(self, micro_batch: int) -> int:
        """Windows to read and push through the prefix at once: a multiple of ``micro_batch`` whose float32 raw
        windows take at most :data:`PREFIX_CHUNK_BYTES` (one micro-batch when that alone is larger)."""
        window = 4 * int(np.prod(self.manifest.input.shape))
        return micro_batch * max(1, PREFIX_CHUNK_BYTES // (window * micro_batch))

    @contextmanager
    def prefix(self, micro_batch: int) -> Iterator[Callable[[np.ndarray], np.ndarray]]:
        """A ``features`` function (raw windows -> prefix features, ``micro_batch`` windows per invoke) on an
        interpreter of its own that lives for the ``with`` block; its memory goes back to the system after.

        Raises:
            InputError: (from the function) windows not of ``manifest.input.shape``.
        """
        held = [load_interpreter(self.path / MODEL_FILE, self.num_threads, {Sig.FEATURES},
                                 fuse=True).get_signature_runner(Sig.FEATURES)]

        def run(x: np.ndarray) -> np.ndarray:
            x = np.asarray(x)
            self._check_shape(Sig.FEATURES, x, False)
            # normalised micro-batch by micro-batch: a normalised copy of all of x (18 MiB for 32 images at 224²)
            # was the largest thing alive while the prefix ran
            return np.concatenate([
                np.array(held[0](**{Sig.X: normalise(x[i:i + micro_batch], self.manifest)})[Sig.FEATURES_IN])
                for i in range(0, len(x), micro_batch)])

        try:
            yield run
        finally:
            held.clear()  # the runner holds the interpreter
            trim_heap()  # the prefix interpreter is gone: hand its memory back before the next arena grows

    def evaluate(self, x: np.ndarray, y: np.ndarray, from_features: bool = False,
                 batch: int = EVAL_BATCH) -> dict[str, float]:
        """Mean loss and accuracy over all of ``x`` (raw windows, or prefix features with ``from_features``).

        Returns:
            ``{"loss": float, "accuracy": float, "n": int}``; NaN loss/accuracy when ``x`` is empty.

        Raises:
            InputError: ``x`` does not have the bundle's input (or features) shape, or ``y`` is not class indices.
        """
        n = len(x)
        if n == 0:
            return {"loss": float("nan"), "accuracy": float("nan"), "n": 0}
        key, name = ((Sig.EVALUATE_FEATURES, Sig.FEATURES_IN) if from_features
                     else (Sig.EVALUATE, Sig.X))
        x = np.asarray(x)
        self._check_shape(key, x, from_features)
        data = x.astype(np.float32, copy=False) if from_features else normalise(x, self.manifest)
        outs = self._batched(key, {name: data, Sig.Y: self._labels(key, y)}, batch)
        sizes = [min(batch, n - i) for i in range(0, n, batch)]
        loss = sum(float(o[Sig.LOSS]) * k for o, k in zip(outs, sizes, strict=True)) / n
        correct = sum(float(o[Sig.CORRECT]) for o in outs)
        return {"loss": loss, "accuracy": correct / n, "n": n}

    def train_step(self, x: np.ndarray, y: np.ndarray, from_features: bool = False) -> tuple[float, float]:
        """One optimizer step on a batch whose size has a train signature; return ``(loss, correct)``.

        ``x`` is raw windows, or prefix features with ``from_features``; ``y`` is cast to the signature's label
        dtype (int64 class indices become int32).

        Raises:
            InputError: ``x`` does not have the bundle's input (or features) shape, or ``y`` is not class indices.
            BundleError: no train signature for ``len(x)``.
        """
        x = np.asarray(x)
        self._check_shape(Sig.TRAIN_FEATURES if from_features else Sig.TRAIN, x, from_features)
        sig = self.manifest.train_signature(len(x))
        key = sig.train_features if from_features else sig.train
        name = Sig.FEATURES_IN if from_features else Sig.X
        data = x.astype(np.float32, copy=False) if from_features else normalise(x, self.manifest)
        out = self.runner(key)(**{name: data, Sig.Y: self._labels(key, y)})
        return float(out[Sig.LOSS]), float(out[Sig.CORRECT])

    def get_weights(self) -> dict[str, np.ndarray]:
        """Copies of every variable (trainable, optimizer, compression state) by manifest name."""
        return {k: np.array(v, copy=True) for k, v in self.runner(Sig.GET_WEIGHTS)().items()}

    def set_weights(self, weights: dict[str, np.ndarray]) -> None:
        """Assign every variable.

        Raises:
            BundleError: a name is missing or unknown, or a shape differs from the manifest.
        """
        specs = {w.name: w for w in self.manifest.weights}
        if set(weights) != set(specs):
            missing, unknown = sorted(set(specs) - set(weights)), sorted(set(weights) - set(specs))
            raise BundleError(f"weights do not match the bundle: missing {missing}, unknown {unknown}")
        for name, value in weights.items():
            if list(np.shape(value)) != list(specs[name].shape):
                raise BundleError(f"weight {name}: shape {list(np.shape(value))}, the bundle has "
                                  f"{specs[name].shape}")
        self.runner(Sig.SET_WEIGHTS)(**{k: np.asarray(v, dtype=specs[k].dtype) for k, v in weights.items()})

    def learning_rate_name(self) -> str | None:
        """Name of the ``optimizer:learning_rate`` variable, if the bundle has one."""
        return next((w.name for w in self.manifest.weights if w.role == "optimizer:learning_rate"), None)

    def set_learning_rate(self, lr: float) -> None:
        """Set the learning rate variable (read-modify-write through get/set_weights).

        Raises:
            BundleError: the bundle has no ``optimizer:learning_rate`` variable.
        """
        name = self.learning_rate_name()
        if name is None:
            raise BundleError("this bundle has no optimizer:learning_rate variable; its rate is fixed")
        weights = self.get_weights()
        weights[name] = np.asarray(lr, dtype=np.float32).reshape(weights[name].shape)
        self.set_weights(weights)


def resolve_bundle(bundles_dir: str | os.PathLike[str], name: str) -> Path:
    """The directory of bundle ``name`` inside ``bundles_dir``.

    ``name`` comes from a request or the config: it must be a plain name, and the resolved path (after
    symlinks) must still lie inside ``bundles_dir``.

    Raises:
        BundleError: the name is not plain, escapes the directory, or names no directory.
    """
    root = Path(bundles_dir).resolve()
    if not name or "/" in name or "\\" in name or name in (".", "..") or "\x00" in name:
        raise BundleError(f"bundle must be a plain name inside {root}, got {name!r}")
    path = (root / name).resolve()
    if not path.is_relative_to(root) or path == root:
        raise BundleError(f"bundle {name!r} resolves to {path}, outside the bundles directory {root}")
    if not path.is_dir():
        have = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
        raise BundleError(f"no bundle {name!r} in {root}; available: {have}")
    return path
