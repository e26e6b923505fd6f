"""Calibration data is disjoint from evaluation data, for every evaluator, and the
transforms (LQER scales, gradient saliences, activation statistics) read only it."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from torch import nn

from evaluators import CharLMEvaluator, VisionEvaluator
from evaluators.data import calibration_text, digits_splits, glyph_test_set, text_splits
from evaluators.lm import calibration_windows

torch.set_num_threads(1)

#: a candidate that exercises every calibration consumer
CALIBRATED = {"quant.weights": "mxint4", "quant.lqer.rank": 4, "sparsity.density": 0.5,
              "sparsity.salience": "fisher", "sparsity.act_threshold": 0.01}


def _record_inputs(model: nn.Module, first: nn.Module) -> tuple[list[torch.Tensor], object]:
    """Record every input ``first`` (a submodule of ``model``) sees, also in deep copies."""
    seen: list[torch.Tensor] = []

    class Rec:  # a plain object: deepcopy gives the copies their own, so keep one list
        def __deepcopy__(self, memo: dict) -> Rec:
            return self

        def __call__(self, mod: nn.Module, args: tuple) -> None:
            seen.append(args[0].detach().clone())

    return seen, first.register_forward_pre_hook(Rec())


def test_calibration_text_shares_no_topic_with_the_evaluation_text() -> None:
    import pydoc_data.topics as topics

    keys = sorted(topics.topics)
    held = [topics.topics[k] for i, k in enumerate(keys) if i % 10 == 0]
    cal = calibration_text()
    assert "\n".join(held) == text_splits()[1]
    assert not [h for h in held if h in cal]  # no held-out topic text inside it
    assert any(h in text_splits()[0] for h in held)  # the duplicate it removes is real
    assert len(cal) > 10 * len(text_splits()[1])


def test_char_lm_calibration_never_evaluated() -> None:
    ev = CharLMEvaluator(budget_tokens=1024, calib_batches=6)
    calib = ev.calibration_inputs()
    assert len(calib) == 6 and all(c.shape == (1, 64) for c in calib)
    held = ev.inputs.flatten().to(torch.uint8).numpy().tobytes()
    for c in calib:  # no calibration window occurs anywhere in the scored stream
        assert c.flatten().to(torch.uint8).numpy().tobytes() not in held
    # what the transforms feed the model: only calibration windows, every one of them
    seen, handle = _record_inputs(ev.model, ev.model.tok)
    try:
        ev.transform(CALIBRATED)
    finally:
        handle.remove()
    assert seen, "the transforms ran no calibration forward"
    calib_set = {c.numpy().tobytes() for c in calib}
    eval_windows = {w.numpy().tobytes() for w in ev.inputs}
    got = {s.reshape(-1, 64)[i].numpy().tobytes() for s in seen
           for i in range(s.reshape(-1, 64).shape[0])}
    assert got == calib_set and not got & eval_windows


def test_calibration_windows_spread_and_errors() -> None:
    t = torch.arange(100)
    w = calibration_windows(t, 10, 4)
    assert [int(x[0, 0]) for x in w] == [0, 30, 60, 90]
    assert len(calibration_windows(t, 10, 1)) == 1
    with pytest.raises(ValueError, match="calib_batches"):
        calibration_windows(t, 10, 11)
    with pytest.raises(ValueError, match="calib_batches"):
        CharLMEvaluator(calib_batches=0)


def _digests(x: np.ndarray) -> set[str]:
    return {hashlib.sha256(np.ascontiguousarray(im).tobytes()).hexdigest() for im in x}


def test_glyph_calibration_images_are_not_test_images() -> None:
    tx, _ = glyph_test_set("test")
    cx, _ = glyph_test_set("calib")
    assert not _digests(tx) & _digests(cx)
    ev = VisionEvaluator("glyph_cnn", budget_images=128, calib_batches=4)
    batches = ev.calibration_inputs()
    assert len(batches) == 4 and sum(b.shape[0] for b in batches) == 32
    assert not _digests(torch.cat(batches).numpy()) & _digests(ev.images.numpy())
    seen, handle = _record_inputs(ev.model, ev.model.features[0])
    try:
        ev.transform(CALIBRATED)
    finally:
        handle.remove()
    assert seen and _digests(torch.cat(seen).numpy()) <= _digests(torch.cat(batches).numpy())


@pytest.mark.slow
def test_digits_calibration_split_is_the_training_split() -> None:
    xtr, _, xte, _ = digits_splits(seed=0)
    from sklearn.datasets import load_digits

    full = (load_digits().images.astype(np.float32) / 16.0)[:, None]
    index = {}
    for i, im in enumerate(full):
        index.setdefault(im.tobytes(), set()).add(i)
    tr = set().union(*(index[im.tobytes()] for im in xtr))
    te = set().union(*(index[im.tobytes()] for im in xte))
    # sample indices: disjoint unless the data set holds the same image twice
    dup = {i for s in index.values() if len(s) > 1 for i in s}
    assert not (tr & te) - dup
    ev = VisionEvaluator("digits", budget_images=64)
    cal = torch.cat(ev.calibration_inputs()).numpy()
    assert all(c.tobytes() in {x.tobytes() for x in xtr} for c in cal)
