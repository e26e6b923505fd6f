"""Names the evaluators share, importable without torch (for spec checks and the CLI).

* :data:`FIDELITIES`: the fidelity levels of every accuracy evaluator (docs/evaluators.md).
* :data:`VISION_KINDS`: the shipped image classifiers: kind -> (weights file under
  ``evaluators/weights/``, data set name). The ``dse`` registry, the ``dataflow``
  simulator's traced networks and the training script all read this one table.
"""

from __future__ import annotations

FIDELITIES: tuple[str, ...] = ("proxy", "full", "gated")

VISION_KINDS: dict[str, tuple[str, str]] = {
    "glyph_cnn": ("glyph_cnn.safetensors", "glyphs"),
    "glyph_vit": ("glyph_vit.safetensors", "glyphs"),
    "digits": ("digits_cnn.safetensors", "digits"),
}
