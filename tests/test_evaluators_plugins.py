"""dse plug-ins of the accuracy evaluators: registry names, option validation, cache dir."""

from __future__ import annotations

from pathlib import Path

import pytest

from dse import registry
from dse.registry import EvalContext


def test_registered_names() -> None:
    for name in ("char_lm", "smollm2", "hf_lm", "glyph_cnn", "glyph_vit", "digits"):
        assert name in registry.names()
        assert callable(registry.get(name).validate_options)


@pytest.mark.parametrize(
    ("name", "options", "match"),
    [
        ("char_lm", {"budget": 10}, "budget"),
        ("char_lm", {"budget_tokens": 0}, "budget_tokens"),
        ("char_lm", {"fidelity": "fast"}, "fidelity"),
        ("hf_lm", {}, "model_dir"),
        ("glyph_cnn", {"gate_kl_nats": -1}, "gate_kl_nats"),
        ("digits", {"cache": "yes"}, "cache"),
        ("smollm2", {"calib_batches": 0}, "calib_batches"),
        ("glyph_vit", {"calib_batches": 1.5}, "calib_batches"),
    ],
)
def test_bad_options(name: str, options: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        registry.get(name).validate_options(options)


def test_char_lm_plugin_caches_under_study_dir(tmp_path: Path) -> None:
    ctx = EvalContext(study_dir=tmp_path, seed=0, num_threads=1, name="char_lm")
    ev = registry.get("char_lm")({"budget_tokens": 512}, ctx)
    r = ev.evaluate({"quant.weights": "mxint4", "hw.mlen": 256}, {})
    assert r["fidelity"] == "full" and isinstance(r["layers"], dict)
    assert len(list((tmp_path / "cache" / "char_lm").glob("*.json"))) == 1
    assert ev.evaluate({"quant.weights": "mxint4", "hw.mlen": 4096}, {}) == r


def test_glyph_cnn_plugin_feeds_dataflow(tmp_path: Path) -> None:
    ctx = EvalContext(study_dir=tmp_path, name="glyph_cnn")
    ev = registry.get("glyph_cnn")({"budget_images": 128, "cache": False}, ctx)
    r = ev.evaluate({"quant.weights": "int8", "sparsity.density": 0.5}, {})
    assert {"features.0", "features.3", "features.6", "features.8", "classifier"} == set(
        r["layer_sparsity"])
    assert not (tmp_path / "cache").exists()


def test_glyph_cnn_layer_sparsity_drives_dataflow(tmp_path: Path) -> None:
    """The measured layer_sparsity is accepted by the dataflow evaluator (sparsity='measured')
    and more pruning makes it skip more products."""
    ctx = EvalContext(study_dir=tmp_path, name="glyph_cnn")
    acc = registry.get("glyph_cnn")({"budget_images": 128, "cache": False}, ctx)
    flow = registry.get("dataflow")({"network": "glyph_cnn", "sparsity": "measured"},
                                    EvalContext(study_dir=tmp_path, name="dataflow"))
    shares = []
    for density in (1.0, 0.3):
        params = {"quant.weights": "int8", "quant.acts": "int8", "sparsity.density": density}
        up = acc.evaluate(params, {})
        out = flow.evaluate(params, up)
        assert out["dataflow_sparsity_source"] == "measured"
        shares.append(out["zero_product_share"])
    assert shares[1] > shares[0] + 0.3
