"""TrainingModule -> SavedModel with every signature -> ``model.tflite`` with TFLITE_BUILTINS only, + op census."""

from __future__ import annotations

import logging
import os
import tempfile
from collections import Counter

import tensorflow as tf
from tensorflow.lite.python import schema_py_generated as schema
from tensorflow.lite.python.lite import TFLiteSavedModelConverterV2

from converter.engine import TrainingModule
from converter.errors import ConversionError
from converter.losses import Loss
from converter.subgraphs import share_identical_subgraphs
from hosvd_contract import Sig

log = logging.getLogger(__name__)


def _function(fn, input_signature) -> tf.types.experimental.GenericFunction:
    """A graph function without AutoGraph: the step has no data-dependent Python control flow (loops are
    explicit ``tf.while_loop``), and AutoGraph's source conversion made tracing several times slower."""
    return tf.function(fn, input_signature=input_signature, autograph=False)


def _label_spec(module: TrainingModule, batch: int | None) -> tf.TensorSpec:
    if module.loss == Loss.CROSSENTROPY:
        return tf.TensorSpec([batch], tf.int32, name=Sig.Y)
    return tf.TensorSpec([batch, *module.graph.output_shape], tf.float32, name=Sig.Y)


def signatures(module: TrainingModule) -> dict[str, tf.types.experimental.ConcreteFunction]:
    """Concrete functions for every signature key of the contract (see ``hosvd_contract.signatures``)."""
    x_dyn = tf.TensorSpec([None, *module.graph.input_shape], tf.float32, name=Sig.X)
    f_dyn = tf.TensorSpec([None, *module.split.features_shape], tf.float32, name=Sig.FEATURES_IN)
    fns = {
        Sig.INFER: _function(lambda x: module.infer_from_features(module.prefix(x)), input_signature=[x_dyn]),
        Sig.EVALUATE: _function(lambda x, y: module.evaluate_from_features(module.prefix(x), y),
                                  input_signature=[x_dyn, _label_spec(module, None)]),
        Sig.FEATURES: _function(lambda x: {Sig.FEATURES_IN: module.prefix(x)}, input_signature=[x_dyn]),
        Sig.EVALUATE_FEATURES: _function(module.evaluate_from_features,
                                           input_signature=[f_dyn, _label_spec(module, None)]),
        Sig.GET_WEIGHTS: _function(module.get_weights, input_signature=[]),
        Sig.SET_WEIGHTS: _function(
            module.set_weights,
            input_signature=[tf.TensorSpec(s.shape, tf.float32, name=s.name) for s in module.weight_specs]),
    }
    default = module.batch_sizes[0]
    for batch in module.batch_sizes:
        x_b = tf.TensorSpec([batch, *module.graph.input_shape], tf.float32, name=Sig.X)
        f_b = tf.TensorSpec([batch, *module.split.features_shape], tf.float32, name=Sig.FEATURES_IN)
        y_b = _label_spec(module, batch)
        fns[Sig.train_name(batch, default)] = _function(
            lambda x, y: module.train_from_features(module.prefix(x), y), input_signature=[x_b, y_b])
        fns[Sig.train_name(batch, default, from_features=True)] = _function(
            module.train_from_features, input_signature=[f_b, y_b])
    return {key: fn.get_concrete_function() for key, fn in fns.items()}


def to_tflite(module: TrainingModule, progress=None) -> bytes:
    """Save the module with its signatures and convert with builtin ops only, identical loop subgraphs shared
    (:mod:`converter.subgraphs`).

    Raises:
        ConversionError: the converter needed Select TF (Flex) or custom ops, listing them.
    """
    sigs = signatures(module)
    if progress:
        progress("traced signatures")
    with tempfile.TemporaryDirectory() as tmp:
        saved = os.path.join(tmp, "saved_model")
        tf.saved_model.save(module, saved, signatures=sigs)
        if progress:
            progress("saved model")
        # The class behind ``from_saved_model``, built directly: that factory loads the SavedModel in Python
        # only to check the keys we just wrote (≈ 4 s on a deep candidate).
        converter = TFLiteSavedModelConverterV2(saved, {tf.saved_model.SERVING}, list(sigs))
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        converter.experimental_enable_resource_variables = True
        converter.exclude_conversion_metadata = True  # no runtime reads it; writing it repacks the flatbuffer
        try:
            flatbuffer = converter.convert()
        except Exception as err:  # the converter reports unsupported ops in its message
            raise ConversionError(f"TFLite conversion with builtin ops only failed: {_short(err)}") from err
    flatbuffer = share_identical_subgraphs(flatbuffer)
    census = op_census(flatbuffer)
    foreign = sorted(op for op in census if op.startswith("CUSTOM:") or "Flex" in op)
    if foreign:
        raise ConversionError(f"the converted model needs non-builtin ops the device runtimes lack: {foreign}")
    return flatbuffer


def _short(err: Exception) -> str:
    lines = [line for line in str(err).splitlines() if "error" in line.lower() or "op" in line.lower()]
    return "\n".join(lines[:12]) or str(err)[:2000]


_BUILTIN_NAMES = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}


def op_census(flatbuffer: bytes) -> dict[str, int]:
    """Operator counts over every subgraph; custom ops appear as ``CUSTOM:<name>``."""
    # Read through the flatbuffer accessors: unpacking into ``ModelT`` objects takes seconds at 10,000+ ops.
    model = schema.Model.GetRootAs(flatbuffer, 0)
    names = []
    for i in range(model.OperatorCodesLength()):
        code = model.OperatorCodes(i)
        builtin = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
        if builtin == schema.BuiltinOperator.CUSTOM:
            names.append(f"CUSTOM:{code.CustomCode().decode()}")
        else:
            names.append(_BUILTIN_NAMES.get(builtin, str(builtin)))
    counts: Counter[str] = Counter()
    for s in range(model.SubgraphsLength()):
        subgraph = model.Subgraphs(s)
        for o in range(subgraph.OperatorsLength()):
            counts[names[subgraph.Operators(o).OpcodeIndex()]] += 1
    return dict(counts.most_common())
