"""Honest sizing: compressed methods need calibration data, static ranks follow the ε-ranks measured on all of it,
the ``--max-rank`` cap is reported where it binds, and no layer allocates as much as its uncompressed input."""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest
from keras import layers

from converter.cli import main
from converter.convert import convert
from converter.errors import ConversionError
from converter.measure import saved_for_backward
from hosvd_contract import MODEL_FILE
from tests.converter.test_convert import small_cnn


def calibration(n: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 8, 8, 1), dtype=np.float32)


@pytest.mark.parametrize("method", ["svd", "hosvd", "asi"])
def test_a_compressed_method_without_calibration_data_names_the_flag(tmp_path, method, capsys):
    with pytest.raises(ConversionError, match="--calibration-data"):
        convert(small_cnn(), tmp_path, train_last=3, compression=method, batch_sizes=(8,), measure_memory=False)
    small_cnn().save(tmp_path / "m.keras")
    assert main(["convert", str(tmp_path / "m.keras"), "--out", str(tmp_path / "b"), "--train-last", "3",
                 "--compression", method, "--no-measure"]) == 2
    assert "--calibration-data" in capsys.readouterr().err


def test_fewer_calibration_samples_than_a_batch_is_refused(tmp_path):
    with pytest.raises(ConversionError, match="5 samples, fewer than the train batch 8"):
        convert(small_cnn(), tmp_path, train_last=3, compression="hosvd", batch_sizes=(8,),
                calibration_data=calibration(5), measure_memory=False)


def test_epsilon_sets_the_static_ranks_and_the_allocation(tmp_path):
    """ε 0.8 and 0.9 on the same calibration data: wherever the ε-ranks differ the static ranks differ, and the
    allocated bytes follow the static ranks (the paper's Tucker size), below the vanilla bytes."""
    layers = {}
    for eps in (0.8, 0.9):
        manifest = convert(small_cnn(), tmp_path / str(eps), train_last=3, compression="hosvd", epsilon=eps,
                           batch_sizes=(8,), calibration_data=calibration(), max_rank=64, measure_memory=False)
        layers[eps] = {i.name: i for i in manifest.layers if i.compression == "hosvd"}
    assert set(layers[0.8]) == set(layers[0.9]) == {"c1", "c2"}
    differing = 0
    for name in ("c1", "c2"):
        low, high = layers[0.8][name], layers[0.9][name]
        for mode, (e_low, e_high) in enumerate(zip(low.calibrated_ranks, high.calibrated_ranks, strict=True)):
            assert e_low <= e_high
            if e_low != e_high:
                differing += 1
                assert low.ranks[mode] < high.ranks[mode], (name, mode, low.ranks, high.ranks)
        for info in (low, high):
            assert all(e <= r <= n for e, r, n in zip(info.calibrated_ranks, info.ranks, info.saved_shape,
                                                      strict=True))
            core = math.prod(info.ranks)
            factors = sum(n * r for n, r in zip(info.saved_shape, info.ranks, strict=True) if r < n)
            assert info.saved_bytes_compressed == 4 * (core + factors)
            assert info.saved_bytes_compressed < info.saved_bytes_vanilla
        assert low.saved_bytes_compressed < high.saved_bytes_compressed
    assert differing >= 2


def test_calibration_uses_every_sample(tmp_path):
    """The first batch holds one sample eight times (rank 1 in every mode); the ε-ranks come from all batches."""
    x = calibration(24)
    x[:8] = x[0]
    first_only = convert(small_cnn(), tmp_path / "a", train_last=3, compression="hosvd", epsilon=0.9,
                         batch_sizes=(8,), calibration_data=x[:8], measure_memory=False)
    everything = convert(small_cnn(), tmp_path / "b", train_last=3, compression="hosvd", epsilon=0.9,
                         batch_sizes=(8,), calibration_data=x, measure_memory=False)
    c2_first = next(i for i in first_only.layers if i.name == "c2")
    c2_all = next(i for i in everything.layers if i.name == "c2")
    assert c2_first.calibrated_ranks[0] == 1
    assert c2_all.calibrated_ranks[0] > 1  # the batch mode: the largest ε-rank over the three batches
    assert all(a >= f for a, f in zip(c2_all.calibrated_ranks, c2_first.calibrated_ranks, strict=True))
    assert c2_all.saved_bytes_compressed > c2_first.saved_bytes_compressed


def test_max_rank_binding_is_reported(tmp_path):
    manifest = convert(small_cnn(), tmp_path, train_last=3, compression="hosvd", epsilon=0.95, batch_sizes=(8,),
                       calibration_data=calibration(), max_rank=2, measure_memory=False)
    c2 = next(i for i in manifest.layers if i.name == "c2")
    assert max(c2.calibrated_ranks) > 2 and max(r for r, n in zip(c2.ranks, c2.saved_shape, strict=True) if r < n) == 2
    assert "--max-rank 2 binds" in c2.note


@pytest.mark.parametrize(("method", "eps", "max_rank"), [("svd", 1.0, 32), ("hosvd", 0.99, 64), ("asi", 0.99, 64)])
def test_no_layer_allocates_as_much_as_vanilla(tmp_path, method, eps, max_rank):
    """Settings that used to allocate more than vanilla (svd with every batch rank kept, high ε, a large cap) save
    those layers uncompressed and say so; every compressed layer allocates strictly less than its input."""
    manifest = convert(small_cnn(), tmp_path, train_last=3, compression=method, epsilon=eps, batch_sizes=(8,),
                       calibration_data=calibration(), max_rank=max_rank, measure_memory=False)
    trained = [i for i in manifest.layers if i.trainable and i.type != "Dense"]
    for info in trained:
        if info.compression == "none":
            assert info.saved_bytes_compressed == info.saved_bytes_vanilla
            assert info.note.startswith("saved uncompressed"), info
        else:
            assert info.saved_bytes_compressed < info.saved_bytes_vanilla, info
    if method == "svd":  # rank-8 batches of random images: the batch factor cannot save anything
        assert {i.compression for i in trained} == {"none"}


def relu_cnn(seed: int = 0) -> keras.Model:
    """ReLU, ReLU6 and a max pool inside the trainable part, large enough that the loss's own few tensors are
    well under 1 % of what is saved."""
    keras.utils.set_random_seed(seed)
    inp = keras.Input((16, 16, 3))
    h = layers.Conv2D(8, 3, padding="same", activation="relu", name="stem")(inp)
    h = layers.Conv2D(16, 3, padding="same", activation="relu", name="c1")(h)
    h = layers.MaxPooling2D(2, name="pool")(h)
    h = layers.Conv2D(16, 3, padding="same", name="c2")(h)
    h = layers.ReLU(6.0, name="relu6")(h)
    h = layers.DepthwiseConv2D(3, padding="same", activation="relu", name="dw")(h)
    h = layers.GlobalAveragePooling2D(name="gap")(h)
    return keras.Model(inp, layers.Dense(3, activation="softmax", name="head")(h), name="relu_cnn")


@pytest.mark.parametrize("method", ["none", "hosvd", "asi"])
def test_reported_saved_bytes_are_what_the_train_graph_keeps(tmp_path, method):
    """The masks are bit-packed and counted, the compressed form is computed in the forward pass, and so what the
    converted train graph keeps from its forward half for its backward half (read off model.tflite, in the
    interpreter's op order) is the converter's reported figure, within 5 %."""
    x = np.random.default_rng(0).standard_normal((32, 16, 16, 3)).astype(np.float32)
    manifest = convert(relu_cnn(), tmp_path, train_last=4, compression=method, batch_sizes=(8,),
                       calibration_data=None if method == "none" else x, measure_memory=False)
    masks = {i.name: i.saved_bytes_masks for i in manifest.layers if i.saved_bytes_masks}
    assert set(masks) == {"c1/relu", "pool", "relu6", "dw/relu"}
    assert masks["c1/relu"] == 8 * 16 * 16 * 16 // 8  # one bit per element
    reported = sum(i.saved_bytes_compressed + i.saved_bytes_masks for i in manifest.layers)
    flatbuffer = (tmp_path / MODEL_FILE).read_bytes()
    for signature in ("train_features", "train"):
        kept = saved_for_backward(flatbuffer, signature)
        total = sum(t.nbytes for t in kept)
        assert total == pytest.approx(reported, rel=0.05), (signature, reported, sorted(
            ((t.nbytes, t.dtype, t.shape) for t in kept), reverse=True)[:8])
        assert not [t for t in kept if t.dtype == "BOOL"], "masks cross as packed uint8"
    if method != "none":
        vanilla = sum(i.saved_bytes_vanilla for i in manifest.layers)
        assert reported < 0.6 * vanilla
