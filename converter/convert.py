"""``convert()``: Keras model -> bundle directory (``model.tflite`` + ``manifest.json``). The only bundle writer."""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import math
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

import converter
from converter.calibration import calibrate
from converter.compression import Method, parse_method
from converter.compression.asi import choose_ranks
from converter.compression.factored import tucker_elements
from converter.compression.ranks import EpsRule, parse_eps_rule, static_ranks
from converter.engine import COMPRESSIBLE, CompressionSettings, TrainingModule, compresses, fitted_ranks, saved_shape
from converter.errors import ConversionError
from converter.export import op_census, to_tflite
from converter.gradient_error import gradient_errors
from converter.graph import Graph, Split, parse_model, split
from converter.layers import module_for
from converter.losses import Loss, choose_loss, saved_compile_loss
from converter.measure import measure
from converter.optimizers import OptimizerConfig, OptimizerName
from hosvd_contract import (
    FORMAT_VERSION,
    MANIFEST_FILE,
    MODEL_FILE,
    InputSpec,
    LayerInfo,
    Manifest,
    MemoryPlanEntry,
    Sig,
    TrainSignature,
    file_sha256,
)

log = logging.getLogger(__name__)

SOURCE_MODEL = "source.keras"  # the converted Keras model, kept for ``hosvd-convert export-keras``

STAGES = ("parse", "calibrate", "build", "convert", "write", "measure")
MODE_NAMES = ("B", "H", "W", "C")
MASKING = ("ReLU", "MaxPooling2D", "MaxPooling1D")  # node kinds that keep a mask for backward


def model_file(path: str | os.PathLike) -> Path:
    """The ``.keras``/``.h5`` file at ``path``, or the first one in the directory ``path``.

    Raises:
        ConversionError: missing file, or a bare TF SavedModel (it has no Keras layer structure to train).
    """
    path = Path(path)
    if path.is_dir():
        candidates = sorted(path.glob("*.keras")) + sorted(path.glob("*.h5"))
        if not candidates:
            hint = (" It is a TensorFlow SavedModel: Keras 3 cannot rebuild its layers, so save the model with "
                    "model.save('model.keras') instead." if (path / "saved_model.pb").exists() else "")
            raise ConversionError(f"no .keras or .h5 model in directory {path}.{hint}")
        path = candidates[0]
    if not path.exists():
        raise ConversionError(f"model file {path} does not exist")
    return path


def load_model(path: str | os.PathLike) -> keras.Model:
    """A Keras model from a ``.keras``/``.h5`` file, or from a directory holding one (see :func:`model_file`).

    Loaded without its optimizer; compiled with the loss saved in the file (when Keras knows it), so ``--loss auto``
    sees it as ``model.loss``.
    """
    file = model_file(path)
    model = keras.models.load_model(file, compile=False)
    saved = saved_compile_loss(file)
    if saved is not None:
        try:
            model.compile(loss=keras.losses.get(saved))
        except (ValueError, TypeError) as err:  # a custom loss: auto will ask for --loss
            log.warning("the compiled loss of %s is not a Keras loss (%s); ignoring it", file, err)
    return model


def _default_layout(shape: tuple[int, ...]) -> str:
    return {3: "NHWC", 2: "NLC", 1: "NC"}.get(len(shape), "N" + "D" * len(shape))


def _full_ranks(ranks: list[int | None], shape: tuple[int, ...]) -> list[int]:
    """Ranks with whole modes (``None``) written as their size, as the manifest reports them."""
    return [size if rank is None else rank for rank, size in zip(ranks, shape, strict=True)]


def _layer_infos(graph: Graph, sp: Split, module: TrainingModule, batch: int,
                 sizing: dict[str, dict]) -> list[LayerInfo]:
    """Per node what the bundle saves for backward at ``batch``: weighted layers' inputs at the static ranks
    (``sizing`` has the ε-ranks and notes of the compressed ones), ReLU/max-pool masks bit-packed."""
    infos = []
    for node in graph.nodes:
        info = dict(name=node.name, type=node.keras_type, trainable=node.trainable, output_shape=list(node.out_shape))
        saves = node.output in sp.needs_grad and node.kind in MASKING
        if node.trainable:
            vanilla = module_for(node.kind).saved_bytes(node, batch)
            info |= dict(saved_bytes_vanilla=vanilla, saved_bytes_compressed=vanilla, compression="none",
                         saved_shape=[batch, *node.in_shapes[0]])
            compressor = module.compressors.get(f"{node.name}@{batch}")
            if compressor is not None:
                shape = saved_shape(node, batch)
                sized = sizing.get(node.name, {})
                eps_ranks = sized.get("eps_ranks")
                info |= dict(compression=compressor.method, saved_shape=list(shape),
                             ranks=_full_ranks(compressor.ranks, shape),
                             calibrated_ranks=None if eps_ranks is None else _full_ranks(eps_ranks, shape),
                             saved_bytes_compressed=4 * compressor.saved_elements(), note=sized.get("note"))
                if compressor.method in ("hosvd", "svd"):
                    info["epsilon"] = module.compression.epsilon
                if "asi_epsilon" in sized:
                    info["epsilon"], info["gradient_error"] = sized["asi_epsilon"], sized["gradient_error"]
        elif saves:
            info |= dict(saved_shape=[batch, *node.in_shapes[0]],
                         saved_bytes_masks=module_for(node.kind).saved_bytes(node, batch))
        infos.append(LayerInfo(**info))
    return infos


def _estimate_peak(sp: Split, module: TrainingModule, infos: list[LayerInfo], batch: int, micro: int) -> int:
    """A rough arena estimate (bytes): weights with optimizer state, what is saved for backward as allocated,
    and the largest activations of the prefix (at ``micro`` samples) and suffix (at the batch) alive at once.
    The measured figure next to it is the one to trust."""
    weights = sum(4 * math.prod(s.shape) for s in module.weight_specs)
    saved = sum(i.saved_bytes_compressed + i.saved_bytes_masks for i in infos)
    biggest = lambda nodes, b: max((4 * b * math.prod(n.out_shape) for n in nodes), default=0)  # noqa: E731
    return weights + saved + 2 * biggest(sp.prefix, micro) + 3 * biggest(sp.suffix, batch)


def _sizing(graph: Graph, sp: Split, method: Method, epsilon: float, rule: EpsRule, max_rank: int,
            ram_budget_mb: float | None, calibration_data: np.ndarray | None, batch: int,
            loss: Loss) -> tuple[dict[str, dict], dict[str, np.ndarray], float, str]:
    """Static ranks of every compressed layer from the calibration data, at ε under ``rule``.

    Returns:
        ``(sizing, first batch of saved inputs for asi, ε used, how asi chose its ranks)``; ``sizing[layer]``
        has ``ranks`` (static), ``eps_ranks`` (on the calibration data) and ``note`` (``--max-rank`` binding); for
        ``asi`` also
        ``asi_epsilon`` and ``gradient_error``, the ε each layer's ranks come from and their measured error.

    Raises:
        ConversionError: a compressed method without calibration data, or calibration data that does not fit.
    """
    nodes = [n for n in sp.trainable if n.keras_type in COMPRESSIBLE]
    if method == Method.NONE or not nodes:
        return {}, {}, epsilon, "eps"
    if calibration_data is None:
        raise ConversionError(
            f"--compression {method.value} needs --calibration-data (representative inputs, at least one train "
            f"batch of {batch}): the static ranks, and so the memory each layer allocates, are sized from the "
            "ε-ranks measured on it; without data use --compression none")
    calibration_data = np.asarray(calibration_data, np.float32)
    if calibration_data.shape[1:] != graph.input_shape:
        raise ConversionError(f"calibration data has samples of shape {calibration_data.shape[1:]}, the model "
                              f"takes {graph.input_shape}")
    try:
        calib = calibrate(graph, sp, calibration_data, batch)
    except ValueError as err:
        raise ConversionError(str(err)) from None
    log.info("calibrated on %d samples (%d whole batches of %d)", calib.samples, calib.batches, batch)
    used_eps, selection = epsilon, "eps"
    if method == Method.ASI:
        budget = None if ram_budget_mb is None else int(ram_budget_mb * 2**20)
        errors = gradient_errors(graph, sp, loss, calibration_data, batch, nodes)
        try:
            plan = choose_ranks([calib.first_batch[n.name] for n in nodes], epsilon, budget, max_rank, errors,
                                rule)
        except ValueError as err:
            raise ConversionError(str(err)) from None
        used_eps, selection = min(plan.epsilons), plan.selection
        eps_ranks = {n.name: r for n, r in zip(nodes, plan.ranks, strict=True)}
        chosen = {n.name: dict(asi_epsilon=e, gradient_error=err)
                  for n, e, err in zip(nodes, plan.epsilons, plan.errors, strict=True)}
        static = {name: (r, [m for m, k in enumerate(r) if k == max_rank]) for name, r in eps_ranks.items()}
    else:
        modes = (0, 1, 2, 3) if method == Method.HOSVD else (0,)
        eps_ranks = {n.name: calib.layers[n.name].eps_ranks(epsilon, modes, rule) for n in nodes}
        static = {n.name: static_ranks(eps_ranks[n.name], saved_shape(n, batch), max_rank) for n in nodes}
    sizing = {}
    for node in nodes:
        ranks, capped = static[node.name]
        note = None
        if capped:
            note = f"--max-rank {max_rank} binds in mode(s) {', '.join(MODE_NAMES[m] for m in capped)}"
            log.warning("layer %s: %s (its ε-rank on the calibration data is larger), so it keeps less energy "
                        "than ε there", node.name, note)
        shape = saved_shape(node, batch)
        fitted = fitted_ranks(ranks, shape)
        if method != Method.NONE and not compresses(shape, fitted):
            would = 4 * tucker_elements(shape, tuple(fitted))
            note = (f"saved uncompressed: at ranks {_full_ranks(fitted, shape)} it would allocate "
                    f"{would / 1024:,.1f} KiB, not less than vanilla {4 * math.prod(shape) / 1024:,.1f} KiB")
        sizing[node.name] = {"ranks": ranks, "eps_ranks": eps_ranks[node.name], "note": note,
                             **(chosen.get(node.name, {}) if method == Method.ASI else {})}
    return sizing, calib.first_batch, used_eps, selection


def convert(
    model: keras.Model | str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    train_last: int,
    compression: str = "hosvd",
    epsilon: float = 0.8,
    eps_rule: str = "energy",
    batch_sizes: Sequence[int] = (32,),
    optimizer: str = "sgd",
    learning_rate: float = 0.01,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    max_rank: int = 32,
    subspace_iters: int = 1,
    warm_start: bool = True,
    oversample: int = 4,
    batch_iters: int = 3,
    calibration_data: np.ndarray | None = None,
    ram_budget_mb: float | None = None,
    labels: Sequence[str] | None = None,
    input_spec: dict | None = None,
    loss: str = "auto",
    micro_batch: int = 1,
    measure_memory: bool = True,
    compare_vanilla: bool = True,
    progress=None,
) -> Manifest:
    """Convert a Keras model into a training bundle.

    Args:
        model: a Keras model, or a path to a ``.keras`` file (or a directory holding one).
        out_dir: the bundle directory to write (created; existing ``model.tflite``/``manifest.json`` replaced).
        train_last: train the last N weighted layers (Conv1D/Conv2D/DepthwiseConv2D/Dense) and all after them.
        compression: ``none``, ``svd``, ``hosvd`` or ``asi``.
        epsilon: energy share kept per mode (the paper's ε), for ``svd``/``hosvd`` and the start of ``asi``.
        eps_rule: which energy ε is a share of, in the static ranks from the calibration data and (``svd``,
            ``hosvd``) at run time: ``energy`` (the paper's rule, all of it) or ``centred`` (the leading
            component, ≈ the batch mean of non-negative activations, always kept, and ε of the energy beyond it;
            keeps more components). See :class:`~converter.compression.ranks.EpsRule`.
        batch_sizes: static batch sizes of the train signatures; the first is the default (``train``).
        optimizer: ``sgd`` or ``adam``.
        learning_rate, momentum, weight_decay: optimizer settings (the learning rate stays settable on device).
        max_rank: cap on the static rank per mode for ``svd``/``hosvd``/``asi`` (the static ranks are sized from
            the measured ε-ranks below it; where it binds the layer's note says so).
        subspace_iters: subspace-iteration steps per mode for ``svd``/``hosvd``.
        warm_start: ``hosvd``: start each step's iteration from the previous step's bases (kept in variables;
            the first step starts from the calibration data's bases); the batch mode always starts cold.
        oversample: ``hosvd``: columns iterated beyond each static rank (sharper bases, not saved).
        batch_iters: ``hosvd``: subspace-iteration steps of the batch mode (cold at every step; B × B, cheap).
        calibration_data: representative inputs (N, ...), at least one train batch; required for ``svd``,
            ``hosvd`` and ``asi``: the static ranks (what each layer allocates) come from their ε-ranks on all of
            it (see :mod:`converter.calibration`).
        ram_budget_mb: for ``asi``: the budget of all saved activations; when ε does not fit, each layer takes
            the candidate ε that minimises the summed gradient error measured on the calibration data (a knapsack,
            :func:`converter.compression.asi.choose_ranks`).
        labels: class names (default ``class_0``…).
        input_spec: extra :class:`~hosvd_contract.InputSpec` fields (``layout``, ``mean``, ``std``,
            ``channels``, ``rate_hz``).
        loss: ``auto`` (the model's compiled loss, else cross-entropy after a final softmax, else an error),
            ``sparse_categorical_crossentropy`` / ``categorical_crossentropy`` (on logits when the model has no
            final softmax; labels are class indices either way), ``mse``. See :func:`converter.losses.choose_loss`.
        micro_batch: micro-batch of the frozen prefix in the measured ``streamed`` plan.
        measure_memory: run each train signature once on ai-edge-litert in a child process and record its RSS.
        compare_vanilla: with ``measure_memory`` and a compressed method, also convert the same model with
            ``none`` (into a temporary directory) and record its measured peaks beside each plan, so the table
            shows what compression saved in this conversion (adds one uncompressed conversion and its
            measurement, usually well under the compressed one's time).
        progress: optional callable ``(stage: str) -> None`` called as each stage starts.

    Returns:
        The manifest written next to the model.

    Raises:
        ConversionError: anything about the model or the options that makes the bundle impossible.
    """
    notify = progress or (lambda stage: None)
    started = time.perf_counter()
    method = parse_method(compression)
    try:
        opt_name = OptimizerName(optimizer)
    except ValueError:
        raise ConversionError(f"unknown optimizer {optimizer!r}; choose sgd or adam") from None
    batch_sizes = [int(b) for b in batch_sizes]
    if not batch_sizes or min(batch_sizes) < 1:
        raise ConversionError(f"batch sizes must be positive integers, got {batch_sizes}")
    if not 0.0 < epsilon <= 1.0:
        raise ConversionError(f"--epsilon must be in (0, 1], got {epsilon}")
    try:
        rule = parse_eps_rule(eps_rule)
    except ValueError as err:
        raise ConversionError(str(err)) from None

    notify("parse")
    if not isinstance(model, keras.Model):
        model = load_model(model)
    compiled_loss = model.loss if getattr(model, "compiled", False) else None
    graph = parse_model(model)
    sp = split(graph, train_last)
    loss_kind = choose_loss(loss, graph.final_softmax, compiled_loss)

    notify("calibrate")
    default_batch = batch_sizes[0]
    sizing, first_batch, used_eps, selection = _sizing(graph, sp, method, epsilon, rule, max_rank, ram_budget_mb,
                                                       calibration_data, default_batch, loss_kind)

    notify("build")
    opt_cfg = OptimizerConfig(name=opt_name, learning_rate=learning_rate, momentum=momentum, weight_decay=weight_decay)
    settings = CompressionSettings(method=method, epsilon=epsilon, eps_rule=rule, max_rank=max_rank,
                                   iters=subspace_iters, warm_start=warm_start, oversample=oversample,
                                   batch_iters=batch_iters)
    module = TrainingModule(graph, sp, loss_kind, opt_cfg, settings, batch_sizes,
                            {name: sized["ranks"] for name, sized in sizing.items()}, first_batch)

    infos = _layer_infos(graph, sp, module, default_batch, sizing)

    notify("convert")
    flatbuffer = to_tflite(module)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model_path = out / MODEL_FILE
    tmp = model_path.with_suffix(".tmp")
    tmp.write_bytes(flatbuffer)
    os.replace(tmp, model_path)
    convert_seconds = time.perf_counter() - started

    notify("write")
    classes = graph.output_shape[-1] if loss_kind == Loss.CROSSENTROPY else 0
    spec_fields = dict(shape=list(graph.input_shape), layout=_default_layout(graph.input_shape))
    spec_fields |= input_spec or {}
    comp = {"method": method.value, "epsilon": epsilon, "eps_rule": rule.value, "max_rank": max_rank,
            "subspace_iters": subspace_iters}
    if method == Method.HOSVD:
        comp |= {"warm_start": warm_start, "oversample": oversample, "batch_iters": batch_iters}
    if method == Method.ASI:
        comp |= {"epsilon_used": used_eps, "ram_budget_mb": ram_budget_mb,
                 "selection": selection}
    if module.state.slots:  # where each warm-start basis lies in the one compression:state variable
        comp["state"] = module.state.layout()
    manifest = Manifest(
        format_version=FORMAT_VERSION,
        model_name=model.name,
        sha256=file_sha256(model_path),
        input=InputSpec(**spec_fields),
        features_shape=list(sp.features_shape),
        output_shape=list(graph.output_shape),
        task="classification" if loss_kind == Loss.CROSSENTROPY else "regression",
        loss=loss_kind.value,
        labels=list(labels) if labels else [f"class_{i}" for i in range(classes)],
        optimizer=opt_cfg.to_manifest(),
        compression=comp,
        train_last=train_last,
        train_signatures=[TrainSignature(b, Sig.train_name(b, default_batch),
                                         Sig.train_name(b, default_batch, from_features=True)) for b in batch_sizes],
        weights=list(module.weight_specs),
        layers=infos,
        op_census=op_census(flatbuffer),
        versions={"hosvd_edge": converter.__version__, "tensorflow": tf.__version__, "keras": keras.__version__,
                  "convert_seconds": f"{convert_seconds:.1f}"},
        created=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    )
    if len(manifest.labels) != classes and loss_kind == Loss.CROSSENTROPY:
        raise ConversionError(f"{len(manifest.labels)} labels given for a model with {classes} classes")
    # Written before measuring: the measurement loads the bundle exactly as the device does.
    (out / MANIFEST_FILE).write_text(manifest.to_json())

    notify("measure")
    vanilla = {}
    if measure_memory and compare_vanilla and any(i.compression not in (None, "none") for i in infos):
        with tempfile.TemporaryDirectory(prefix="hosvd-vanilla-") as tmp_dir:
            baseline = convert(model, tmp_dir, train_last=train_last, compression="none", batch_sizes=batch_sizes,
                               optimizer=optimizer, learning_rate=learning_rate, momentum=momentum,
                               weight_decay=weight_decay, loss=loss, labels=labels, input_spec=input_spec,
                               micro_batch=micro_batch, compare_vanilla=False)
        vanilla = {(m.batch_size, m.mode): m for m in baseline.memory_plan}
    plan = []
    for batch in batch_sizes:
        batch_infos = infos if batch == default_batch else _layer_infos(graph, sp, module, batch, sizing)
        for mode, micro in (("whole", batch), ("streamed", min(micro_batch, batch))):
            entry = dict(batch_size=batch, mode=mode, micro_batch=micro,
                         estimated_peak_bytes=_estimate_peak(sp, module, batch_infos, batch, micro))
            if measure_memory:
                result = measure(out, batch, mode, micro)
                entry |= dict(measured_peak_rss_bytes=result["peak_rss_bytes"],
                              measured_base_rss_bytes=result["base_rss_bytes"], runtime=result["runtime"],
                              measured_anon_rss_bytes=result["anon_rss_bytes"])
            if (batch, mode) in vanilla:
                entry |= dict(vanilla_peak_rss_bytes=vanilla[batch, mode].measured_peak_rss_bytes,
                              vanilla_anon_rss_bytes=vanilla[batch, mode].measured_anon_rss_bytes)
            plan.append(MemoryPlanEntry(**entry))
    manifest = dataclasses.replace(manifest, memory_plan=plan)
    (out / MANIFEST_FILE).write_text(manifest.to_json())
    model.save(out / SOURCE_MODEL)  # for export-keras; the device never reads it
    log.info("wrote bundle %s (%d ops, %.1f s)", out, sum(manifest.op_census.values()), convert_seconds)
    return manifest
