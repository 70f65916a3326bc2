"""Keras model -> flat list of :class:`Node` in topological order, and its split at ``--train-last``.

A layer's fused ``activation`` becomes a node of its own, so every backward rule sees one operation. Layers
the registry does not know may sit in the frozen prefix (they only run forward, through Keras itself); in the
trainable part they are a :class:`ConversionError` naming the layer and its type.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from converter.errors import ConversionError
from converter.layers import MODULES, WEIGHTED_TYPES
from converter.layers.base import Node

log = logging.getLogger(__name__)

FALLBACK = "KerasForward"  # kind of a frozen-only node run through Keras itself
_IDENTITY_TYPES = ("Dropout", "SpatialDropout1D", "SpatialDropout2D", "GaussianNoise", "InputLayer")


@dataclass
class Graph:
    """The parsed model. ``output`` is the tensor id before a final softmax (the logits) when there is one."""

    nodes: list[Node]
    input_id: int
    output: int
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    final_softmax: bool


@dataclass
class Split:
    """Frozen prefix and trainable suffix. ``features`` is the one tensor that crosses between them."""

    prefix: list[Node]
    suffix: list[Node]
    features: int
    features_shape: tuple[int, ...]
    trainable: list[Node]
    needs_grad: set[int]  # tensor ids whose gradient the backward pass must compute


def _shape(tensor) -> tuple[int, ...]:
    return tuple(int(d) for d in tensor.shape[1:])


def _activation_name(layer) -> str | None:
    act = getattr(layer, "activation", None)
    if act is None:
        return None
    name = getattr(act, "__name__", str(act))
    return None if name == "linear" else name


def parse_model(model) -> Graph:
    """Flatten a Keras functional or Sequential model into nodes.

    Raises:
        ConversionError: multiple inputs or outputs, a shared layer, a nested model, a softmax that is not last.
    """
    functional = getattr(model, "_functional", None) or model
    if len(functional.inputs) != 1 or len(functional.outputs) != 1:
        raise ConversionError(f"model {model.name!r} must have exactly one input and one output, it has "
                              f"{len(functional.inputs)} and {len(functional.outputs)}")
    ids: dict[tuple[str, int, int], int] = {}

    def tensor_id(t) -> int:
        op, node_index, tensor_index = t._keras_history
        return ids.setdefault((op.name, node_index, tensor_index), len(ids))

    input_id = tensor_id(functional.inputs[0])
    nodes: list[Node] = []
    for layer in functional.operations:
        cls = type(layer).__name__
        if cls == "InputLayer":
            continue
        if len(layer._inbound_nodes) != 1:
            raise ConversionError(f"layer {layer.name!r} ({cls}) is used {len(layer._inbound_nodes)} times; "
                                  "shared layers are not supported")
        if hasattr(layer, "operations") and hasattr(layer, "inputs"):
            raise ConversionError(f"layer {layer.name!r} is a nested model; flatten it before converting")
        knode = layer._inbound_nodes[0]
        inputs = [tensor_id(t) for t in knode.input_tensors]
        in_shapes = [_shape(t) for t in knode.input_tensors]
        out_tensor = knode.output_tensors[0]
        out_shape = _shape(out_tensor)
        nodes.extend(_nodes_for_layer(layer, cls, inputs, in_shapes, out_shape, tensor_id(out_tensor), ids))

    output_id = tensor_id(functional.outputs[0])
    nodes = fold_zero_padding(nodes, output_id)
    final_softmax = bool(nodes) and nodes[-1].kind == "Softmax"
    for node in nodes[:-1] if final_softmax else nodes:
        if node.kind == "Softmax":
            raise ConversionError(f"layer {node.layer!r}: softmax is supported only as the model's last operation")
    if final_softmax:
        output_id = nodes.pop().inputs[0]
    return Graph(nodes, input_id, output_id, _shape(functional.inputs[0]), _shape(functional.outputs[0]),
                 final_softmax)


_PADDED_CONVS = ("Conv2D", "DepthwiseConv2D")


def fold_zero_padding(nodes: list[Node], output_id: int) -> list[Node]:
    """Each ZeroPadding2D read only by one Conv2D/DepthwiseConv2D becomes part of that convolution's padding.

    The padded tensor was a full-size copy of the activation, alive beside it, and the one a trained layer saved
    (MobileNetV2's stride-2 blocks pad before their depthwise layer: at the last 20 layers, a 15.8 MiB padded
    copy of a 13.8 MiB input was the train step's peak while it was compressed). Folded, the convolution saves
    the unpadded input, its forward pads only as it convolves, and the gradients are the same.
    """
    readers: dict[int, list[Node]] = {}
    for node in nodes:
        for t in node.inputs:
            readers.setdefault(t, []).append(node)
    folded = set()
    for pad in nodes:
        if pad.keras_type != "ZeroPadding2D" or pad.output == output_id or len(readers.get(pad.output, [])) != 1:
            continue
        conv = readers[pad.output][0]
        if conv.kind not in _PADDED_CONVS or conv.inputs != [pad.output]:
            continue
        cfg = conv.config
        cfg["pads"] = tuple((a + c, b + d) for (a, b), (c, d) in zip(pad.config["pads"], cfg["pads"], strict=True))
        cfg["in_hw"] = tuple(pad.in_shapes[0][:2])
        conv.inputs, conv.in_shapes = list(pad.inputs), [pad.in_shapes[0]]
        folded.add(pad.name)
        log.debug("%s: %s folded into its padding", conv.name, pad.name)
    return [n for n in nodes if n.name not in folded]


def _nodes_for_layer(layer, cls: str, inputs, in_shapes, out_shape, out_id: int, ids: dict) -> list[Node]:
    act = _activation_name(layer) if cls != "Activation" else None
    pre_act_id = len(ids) if act else out_id
    if act:
        ids[(layer.name, -1, 0)] = pre_act_id  # the pre-activation tensor has no Keras handle of its own
    if cls == "Activation":
        act_name = _activation_name(layer) or "linear"
        return [_activation_node(layer.name, layer.name, cls, act_name, inputs[0], out_id, in_shapes[0])]
    node = Node(name=layer.name, layer=layer.name, keras_type=cls, kind=cls, inputs=inputs, output=pre_act_id,
                in_shapes=in_shapes, out_shape=out_shape)
    module = MODULES.get(cls)
    if cls == "Softmax":
        node.kind = "Softmax"
    elif cls == "ReLU":
        if float(layer.negative_slope) != 0.0 or float(layer.threshold) != 0.0:
            node.kind, node.config = FALLBACK, {"layer": layer}
        else:
            node.config = {"max_value": None if layer.max_value is None else float(layer.max_value)}
            if node.config["max_value"] not in (None, 6.0):
                node.kind, node.config = FALLBACK, {"layer": layer}
    elif cls in ("ZeroPadding2D", "ZeroPadding1D"):
        pads = layer.padding if cls == "ZeroPadding2D" else (layer.padding,)
        node.config = {"pads": [list(p) for p in pads]}
    elif module is None or (cls.startswith("GlobalAveragePooling") and getattr(layer, "keepdims", False)):
        node.kind, node.config = FALLBACK, {"layer": layer}
    elif hasattr(module, "parse"):
        module.parse(layer, node)
    if cls in _IDENTITY_TYPES:
        node.kind = "Dropout"
    nodes = [node]
    if act:
        act_node = _activation_node(f"{layer.name}/{act}", layer.name, cls, act, pre_act_id, out_id, out_shape)
        nodes.append(act_node)
    return nodes


def _activation_node(name: str, layer: str, cls: str, act: str, in_id: int, out_id: int,
                     shape: tuple[int, ...]) -> Node:
    node = Node(name=name, layer=layer, keras_type=f"{cls}(activation={act})", kind="ReLU", inputs=[in_id],
                output=out_id, in_shapes=[shape], out_shape=shape)
    if act == "relu":
        node.config = {"max_value": None}
    elif act == "relu6":
        node.config = {"max_value": 6.0}
    elif act == "softmax":
        node.kind = "Softmax"
    elif act == "linear":
        node.kind = "Dropout"  # identity
    else:
        node.kind, node.config = FALLBACK, {"activation": act}
    return node


def split(graph: Graph, train_last: int) -> Split:
    """The paper's setting: the last ``train_last`` weighted layers, and everything after the first of them.

    The cut is moved earlier, if needed, until exactly one tensor crosses it (a residual branch that spans the
    cut would otherwise need two feature tensors); layers between the moved cut and the first trained layer stay
    frozen but run in the suffix.

    Raises:
        ConversionError: ``train_last`` out of range, or an unsupported layer in the trainable part.
    """
    weighted = [i for i, n in enumerate(graph.nodes) if n.keras_type in WEIGHTED_TYPES]
    if not 1 <= train_last <= len(weighted):
        raise ConversionError(f"--train-last must be between 1 and {len(weighted)} (the model's weighted layers: "
                              f"Conv1D/Conv2D/DepthwiseConv2D/Dense), got {train_last}")
    trained_idx = weighted[-train_last:]
    first = trained_idx[0]
    cut = first
    while True:
        produced = {graph.input_id} | {n.output for n in graph.nodes[:cut]}
        crossing = {t for n in graph.nodes[cut:] for t in n.inputs if t in produced}
        if len(crossing) == 1:
            break
        cut -= 1
    features = crossing.pop()
    prefix, suffix = graph.nodes[:cut], graph.nodes[cut:]
    trainable = [graph.nodes[i] for i in trained_idx]
    for node in trainable:
        node.trainable = True
    for node in graph.nodes[first:]:
        if node.kind == FALLBACK:
            raise ConversionError(f"layer {node.layer!r} ({node.keras_type}) is in the trainable part but has no "
                                  "backward pass in hosvd-edge; supported: " + ", ".join(sorted(MODULES)))
        check = getattr(MODULES.get(node.kind), "check_trainable", None)
        if check:
            check(node)
    needs_grad: set[int] = set()
    for node in suffix:
        if node.trainable or any(t in needs_grad for t in node.inputs):
            needs_grad.add(node.output)
    features_shape = graph.input_shape if features == graph.input_id else next(
        n.out_shape for n in graph.nodes if n.output == features)
    return Split(prefix, suffix, features, features_shape, trainable, needs_grad)
