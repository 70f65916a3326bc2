"""Max/Average pooling (1-D and 2-D) and global average pooling: forward, backward, saved size.

In the trainable part the backward pass supports non-overlapping windows (pool size = stride, no padding),
the usual CNN case: the gradient is the upsampled output gradient, routed by a bool mask of the maxima for max
pooling (ties all receive it) or divided by the window size for average pooling.
"""

from __future__ import annotations

import math

import tensorflow as tf

from converter import ops
from converter.errors import ConversionError
from converter.layers.base import ForwardContext, Node, pack_mask_by_rows, packed_mask_bytes, unpack_mask

WEIGHTED = False


def parse(layer, node: Node) -> None:
    pool, strides = tuple(layer.pool_size), tuple(layer.strides)
    if len(pool) == 1:
        pool, strides = (1, pool[0]), (1, strides[0])
    spatial = node.in_shapes[0][:-1]
    in_hw = (1, spatial[0]) if len(spatial) == 1 else tuple(spatial)
    pads = ((0, 0), (0, 0))
    if layer.padding == "same":
        pads = tuple(ops.same_pads(in_hw[a], pool[a], strides[a], 1) for a in range(2))
    node.config = {"op": "max" if "Max" in node.keras_type else "avg", "pool": pool, "strides": strides,
                   "padding": layer.padding.upper(), "pads": pads, "in_hw": in_hw, "unit_height": len(spatial) == 1}


def check_trainable(node: Node) -> None:
    cfg = node.config
    if cfg["pool"] != cfg["strides"] or any(cfg["pads"][0]) or any(cfg["pads"][1]):
        raise ConversionError(
            f"layer {node.layer!r} ({node.keras_type}) is in the trainable part but its windows overlap or are "
            f"padded (pool {cfg['pool']}, strides {cfg['strides']}, padding {cfg['padding'].lower()}): only "
            "pool_size == strides without padding has a backward pass; train fewer layers (--train-last)")


def _to4(x: tf.Tensor, cfg: dict) -> tf.Tensor:
    return tf.expand_dims(x, 1) if cfg["unit_height"] else x


def _from4(x: tf.Tensor, cfg: dict) -> tf.Tensor:
    return tf.squeeze(x, 1) if cfg["unit_height"] else x


def forward(node: Node, params: dict, xs: list[tf.Tensor], ctx: ForwardContext):
    cfg = node.config
    x = _to4(xs[0], cfg)
    pool = tf.nn.max_pool2d if cfg["op"] == "max" else tf.nn.avg_pool2d
    y = pool(x, cfg["pool"], cfg["strides"], cfg["padding"])
    saved = None
    if ctx.training and cfg["op"] == "max":
        covered = _covered(x, y, cfg)
        saved = pack_mask_by_rows([covered, y], lambda xs, ys: tf.equal(xs, _upsample(ys, cfg["pool"])),
                                  math.prod(covered.shape[1:]))
    return _from4(y, cfg), saved


def _covered(x: tf.Tensor, y: tf.Tensor, cfg: dict) -> tf.Tensor:
    """The part of ``x`` the windows cover (a 'valid' remainder is dropped)."""
    h, w = y.shape[1] * cfg["pool"][0], y.shape[2] * cfg["pool"][1]
    return x[:, :h, :w, :]


def _upsample(t: tf.Tensor, pool: tuple[int, int]) -> tf.Tensor:
    """Repeat each element ph×pw times: TILE over 4-D views."""
    b, h, w, c = t.shape
    ph, pw = pool
    t = tf.reshape(tf.tile(tf.reshape(t, [b, h, 1, w * c]), [1, 1, ph, 1]), [b, h * ph, w, c])
    t = tf.reshape(tf.tile(tf.reshape(t, [b * h * ph, w, 1, c]), [1, 1, pw, 1]), [b, h * ph, w * pw, c])
    return t


def backward(node: Node, params: dict, saved, dy: tf.Tensor, need_dx: bool):
    if not need_dx:
        return [None], {}
    cfg = node.config
    up = _upsample(_to4(dy, cfg), cfg["pool"])
    window = float(cfg["pool"][0] * cfg["pool"][1])
    dx = tf.where(unpack_mask(saved, up), up, tf.zeros_like(up)) if cfg["op"] == "max" else up / window
    tail_h, tail_w = cfg["in_hw"][0] - dx.shape[1], cfg["in_hw"][1] - dx.shape[2]
    if tail_h or tail_w:
        dx = tf.pad(dx, [[0, 0], [0, tail_h], [0, tail_w], [0, 0]])
    return [_from4(dx, cfg)], {}


def saved_bytes(node: Node, batch: int) -> int:
    """Max pooling keeps a bit-packed mask of the input its windows cover; average pooling keeps nothing."""
    if node.config["op"] != "max":
        return 0
    (ph, pw), (h, w), c = node.config["pool"], node.config["in_hw"], node.in_shapes[0][-1]
    return packed_mask_bytes(batch * (h // ph) * ph * (w // pw) * pw * c)
