"""The exported ``tf.Module``: signatures whose graphs are the explicit train step, built from the layer modules.

``train`` = frozen prefix (constants) -> trainable suffix forward (saving compressed inputs) -> loss gradient
-> suffix backward in reverse -> optimizer updates. No GradientTape anywhere, so the graph lowers to builtin
TFLite ops only.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf

from converter.compression import Method
from converter.compression.asi import Asi
from converter.compression.factored import Factored, tucker_elements
from converter.compression.hosvd import Hosvd
from converter.compression.none import Vanilla
from converter.compression.ranks import EpsRule
from converter.compression.state import PackedState
from converter.compression.svd import BatchSvd
from converter.graph import FALLBACK, Graph, Split
from converter.layers import module_for
from converter.layers.base import INFERENCE, ForwardContext, Node
from converter.losses import LOSSES, Loss
from converter.ops import depend
from converter.optimizers import OptimizerConfig, apply
from hosvd_contract import Sig, WeightSpec

COMPRESSIBLE = ("Conv2D", "Conv1D", "DepthwiseConv2D")
STATE_NAME = "compression__state"


@dataclass(frozen=True)
class CompressionSettings:
    method: Method = Method.HOSVD
    epsilon: float = 0.8
    eps_rule: EpsRule = EpsRule.ENERGY  # svd/hosvd: which energy ε is a share of at run time
    max_rank: int = 32
    iters: int = 1
    warm_start: bool = True  # hosvd: start each step's subspace iteration from the previous step's bases
    oversample: int = 4  # hosvd: extra iteration columns beyond the static rank (not saved)
    batch_iters: int = 3  # hosvd/svd: steps for the batch mode, which starts cold at every step


def weight_name(layer: str, role: str) -> str:
    """A signature-safe tensor name for ``layer``/``role`` (letters, digits, underscores)."""
    return re.sub(r"[^0-9A-Za-z_]", "_", f"{layer}__{role}".replace("optimizer:", "").replace("compression:", ""))


def fitted_ranks(ranks: list[int | None], shape: tuple[int, ...]) -> list[int | None]:
    """``ranks`` at a given saved shape: a rank that reaches its mode's size means the whole mode (``None``)."""
    return [None if r is None or r >= size else r for r, size in zip(ranks, shape, strict=True)]


def compresses(shape: tuple[int, ...], ranks: list[int | None]) -> bool:
    """True when the Tucker form at ``ranks`` allocates less than the activation itself."""
    return tucker_elements(shape, tuple(ranks)) < math.prod(shape)


def saved_shape(node: Node, batch: int) -> tuple[int, ...]:
    """Shape of the 4-D activation a compressible layer saves (Conv1D's is (B, 1, L, C))."""
    shape = node.in_shapes[0]
    return (batch, 1, *shape) if len(shape) == 2 else (batch, *shape)


class TrainingModule(tf.Module):
    """Variables for the trainable weights, optimizer and compression state; constants for everything frozen."""

    def __init__(self, graph: Graph, split: Split, loss: Loss, optimizer: OptimizerConfig,
                 compression: CompressionSettings, batch_sizes: list[int],
                 ranks: dict[str, list[int | None]] | None = None,
                 calibration: dict[str, np.ndarray] | None = None):
        super().__init__(name="hosvd_edge")
        self.graph, self.split, self.loss, self.opt = graph, split, loss, optimizer
        self.compression, self.batch_sizes = compression, batch_sizes
        self.weight_specs: list[WeightSpec] = []
        self._vars: list[tf.Variable] = []
        self.trainable_vars: dict[str, dict[str, tf.Variable]] = {}
        self.slots: dict[str, dict[str, tf.Variable]] = {}  # keyed 'node/role'
        for node in split.trainable:
            self.trainable_vars[node.name] = {
                role: self._add_var(node.layer, role, value) for role, value in node.weights.items()}
        for node in split.trainable:
            for role, var in self.trainable_vars[node.name].items():
                self.slots[f"{node.name}/{role}"] = {
                    slot: self._add_var(node.layer, f"optimizer:{slot}", np.zeros(var.shape, np.float32),
                                        name=weight_name(node.layer, f"{role}__{slot}"))
                    for slot in optimizer.slots()}
        # Shape [1], not []: ai-edge-litert on aarch64 segfaults resizing a 0-d signature input (set_weights).
        self.lr = self._add_var("", "optimizer:learning_rate", np.full([1], optimizer.learning_rate, np.float32),
                                name="optimizer__learning_rate")
        self.step = self._add_var("", "optimizer:step", np.zeros([1], np.float32), name="optimizer__step")
        self.compressors: dict[str, object] = {}  # keyed 'node@batch'
        self.state = PackedState()  # every compressor's warm-start bases, in one variable
        for batch in batch_sizes:
            for node in split.trainable:
                if node.keras_type in COMPRESSIBLE:
                    self.compressors[f"{node.name}@{batch}"] = self._compressor(node, batch, ranks, calibration)
        if self.state.build(STATE_NAME) is not None:
            self._register(self.state.variable, "", "compression:state", STATE_NAME)

    # -- construction -------------------------------------------------------------------------------------
    def _add_var(self, layer: str, role: str, value, name: str | None = None) -> tf.Variable:
        name = name or weight_name(layer, role)
        value = np.asarray(value, np.float32)
        if value.ndim == 0:  # it would become a 0-d set_weights input: see Sig / docs/bundle.md
            raise ValueError(f"variable {name} is 0-d; bundle variables travel with shape [1] at least")
        return self._register(tf.Variable(value, name=name), layer, role, name)

    def _register(self, var: tf.Variable, layer: str, role: str, name: str) -> tf.Variable:
        self._vars.append(var)
        self.weight_specs.append(WeightSpec(name=name, layer=layer, role=role, shape=list(var.shape)))
        return var

    def _compressor(self, node: Node, batch: int, ranks_by_node, calibration):
        """The layer's compression at ``batch``: the method at the ranks sized at conversion (calibration, asi
        budget), a mode whose rank reaches its size kept whole, and :class:`Vanilla` where no ranks were given or
        the compressed form would allocate at least as much as the activation itself."""
        shape = saved_shape(node, batch)
        c = self.compression
        wanted = (ranks_by_node or {}).get(node.name)
        if c.method == Method.NONE or wanted is None:
            return Vanilla(shape)
        ranks = fitted_ranks(wanted, shape)
        if not compresses(shape, ranks):
            return Vanilla(shape)
        method_cls = {Method.SVD: BatchSvd, Method.HOSVD: Hosvd}.get(c.method)
        suffix = "" if batch == self.batch_sizes[0] else f"_b{batch}"
        name = weight_name(node.layer, c.method.value) + suffix
        if method_cls is not None:
            calib = calibration.get(node.name) if calibration else None  # the bases of modes H, W, C fit any batch
            extras = (dict(warm=c.warm_start, oversample=c.oversample, batch_iters=c.batch_iters)
                      if c.method == Method.HOSVD else {})  # svd has only the batch mode: its steps are ``iters``
            return method_cls(shape, c.epsilon, ranks, c.iters, name=name, layer=node.layer, state=self.state,
                              calibration=calib, rule=c.eps_rule, **extras)
        calib = calibration.get(node.name) if calibration and batch == self.batch_sizes[0] else None
        return Asi(shape, ranks, calib, name=name, layer=node.layer, state=self.state)

    # -- graph pieces -------------------------------------------------------------------------------------
    def _params(self, node: Node) -> dict:
        if node.name in self.trainable_vars:
            return dict(self.trainable_vars[node.name])
        return frozen_params(node)

    def _run(self, nodes: list[Node], tensors: dict[int, tf.Tensor], ctx_for, tie: bool = False) -> dict[str, object]:
        return run_nodes(nodes, tensors, self._params, ctx_for, tie)

    def prefix(self, x: tf.Tensor) -> tf.Tensor:
        tensors = {self.graph.input_id: x}
        self._run(self.split.prefix, tensors, lambda node: INFERENCE)
        return tensors[self.split.features]

    def _suffix_inference(self, features: tf.Tensor) -> tf.Tensor:
        tensors = {self.split.features: features}
        self._run(self.split.suffix, tensors, lambda node: INFERENCE)
        return tensors[self.graph.output]

    def _outputs(self, logits: tf.Tensor) -> tf.Tensor:
        return tf.nn.softmax(logits) if self.loss == Loss.CROSSENTROPY else logits  # probabilities, logits or not

    def evaluate_from_features(self, features: tf.Tensor, y: tf.Tensor) -> dict[str, tf.Tensor]:
        loss, _, correct = LOSSES[self.loss](self._suffix_inference(features), y)
        return {Sig.LOSS: loss, Sig.CORRECT: correct}

    def infer_from_features(self, features: tf.Tensor) -> dict[str, tf.Tensor]:
        return {Sig.OUTPUT: self._outputs(self._suffix_inference(features))}

    def train_from_features(self, features: tf.Tensor, y: tf.Tensor) -> dict[str, tf.Tensor]:
        """One optimizer step; returns the loss and the number correct *before* the update."""
        batch = features.shape[0]
        state = self.state.begin()

        def compress(node: Node, x: tf.Tensor):
            return self.compressors[f"{node.name}@{batch}"].compress(x, state)

        loss, correct, weight_grads = self.gradients(features, y, compress)
        step = self.step + 1.0
        last = weight_grads[self.split.trainable[0].name]  # the backward pass ends at the first trained layer
        updates = [self.step.assign(step), *state.assign(after=next(iter(last.values())))]
        lr, step = tf.reshape(self.lr, []), tf.reshape(step, [])
        for node in self.split.trainable:
            for role, var in self.trainable_vars[node.name].items():
                updates += apply(self.opt, var, weight_grads[node.name][role], self.slots[f"{node.name}/{role}"],
                                 lr, step)
        with tf.control_dependencies(updates):
            return {Sig.LOSS: tf.identity(loss), Sig.CORRECT: tf.identity(correct)}

    def gradients(self, features: tf.Tensor, y: tf.Tensor, compress) -> tuple[tf.Tensor, tf.Tensor, dict]:
        """Forward the suffix saving each compressible input as ``compress(node, x) -> Factored`` says, the loss,
        and the backward pass: ``(loss, correct, weight gradients by node and role)``."""
        training = ForwardContext(training=True, compress=compress)
        needs_grad = self.split.needs_grad
        tensors = {self.split.features: features}
        saved = self._run(self.split.suffix, tensors,
                          lambda node: training if node.output in needs_grad else INFERENCE, tie=True)
        loss, dlogits, correct = LOSSES[self.loss](tensors[self.graph.output], y)
        return loss, correct, self._backward(saved, dlogits)

    def _backward(self, saved: dict, dlogits: tf.Tensor) -> dict[str, dict[str, tf.Tensor]]:
        needs_grad = self.split.needs_grad
        grads = {self.graph.output: dlogits}
        weight_grads = {}
        for node in reversed(self.split.suffix):
            if node.output not in needs_grad or node.output not in grads:
                continue
            dy = grads.pop(node.output)
            wants = [t in needs_grad for t in node.inputs]
            dxs, wgrads = module_for(node.kind).backward(node, self._params(node),
                                                         after_dy(node, saved[node.name], dy), dy, any(wants))
            for tensor_id, dx, want in zip(node.inputs, dxs, wants, strict=True):
                if want and dx is not None:
                    grads[tensor_id] = grads[tensor_id] + dx if tensor_id in grads else dx
            if node.trainable:
                weight_grads[node.name] = wgrads
        return weight_grads

    def get_weights(self) -> dict[str, tf.Tensor]:
        return {spec.name: tf.identity(var) for spec, var in zip(self.weight_specs, self._vars, strict=True)}

    def set_weights(self, *values: tf.Tensor) -> dict[str, tf.Tensor]:
        """Assign every variable, in ``weight_specs`` order (the signature names the inputs)."""
        updates = [var.assign(value) for var, value in zip(self._vars, values, strict=True)]
        with tf.control_dependencies(updates):
            return {Sig.OK: tf.constant(1, tf.int32)}


def frozen_params(node: Node) -> dict[str, tf.Tensor]:
    """A node's weights as constants (frozen layers, calibration)."""
    return {role: tf.constant(value) for role, value in node.weights.items()}


def run_nodes(nodes: list[Node], tensors: dict[int, tf.Tensor], params_for, ctx_for,
              tie: bool = False) -> dict[str, object]:
    """Forward ``nodes`` in order, reading inputs from and writing outputs to ``tensors`` (by tensor id).

    With ``tie`` each output is made to depend on what its node saved (:func:`tie_to_saved`), so the saved form
    is computed during the forward pass and the full-size input can die there.

    Returns what each node saved for its backward pass, by node name.
    """
    saved = {}
    for node in nodes:
        xs = [tensors[i] for i in node.inputs]
        if node.kind == FALLBACK:
            tensors[node.output] = _keras_forward(node, xs[0])
            continue
        y, saved[node.name] = module_for(node.kind).forward(node, params_for(node), xs, ctx_for(node))
        tensors[node.output] = tie_to_saved(y, saved[node.name]) if tie else y
    return saved


def tie_to_saved(y: tf.Tensor, saved) -> tf.Tensor:
    """``y`` made to depend (:func:`~converter.ops.depend`) on the tensor its node saved (a packed mask), so the
    interpreter computes it before anything downstream of ``y`` and the full-size input can die in the forward
    pass.

    Without it the TFLite converter scheduled the saved form where it is first read, in the backward pass
    (measured: a layer's hosvd ran after the head's update; its input and a transposed copy were alive across
    the loss). A compressed input (:class:`Factored`) needs no tie here: the layer's op already waits for its
    core (:func:`~converter.layers.base.after_saved`).
    """
    return depend(y, saved) if isinstance(saved, tf.Tensor) and saved is not y else y


def after_dy(node: Node, saved, dy: tf.Tensor):
    """The saved form of a node made to depend on its output gradient, so what its backward computes from it
    (the expanded core, the padded input, masked factors) runs in that backward step, not in the forward pass.

    Without it the converter merged the weight gradient's zero-padding of a whole saved input with the forward
    convolution's own padding and kept the padded copy (65 % larger at 7×7 with a 3×3 kernel) instead of the
    input. A whole input that is not padded is left alone: the tie (``x + 0``) would be a full-size copy of it."""
    if not isinstance(saved, Factored):
        return saved
    if not saved.compressed and not any(p for pads in node.config.get("pads", ()) for p in pads):
        return saved
    return Factored(depend(saved.core, dy), tuple(None if u is None else depend(u, dy) for u in saved.factors))


def _keras_forward(node: Node, x: tf.Tensor) -> tf.Tensor:
    """A frozen-prefix layer hosvd-edge has no rule for: run Keras' own forward (inference mode)."""
    if "activation" in node.config:
        return keras.activations.get(node.config["activation"])(x)
    return node.config["layer"](x, training=False)
