"""Names the evaluators share, importable without torch (for spec checks and the CLI).

* :data:`FIDELITIES`: the fidelity levels of every accuracy evaluator (docs/evaluators.md).
* :data:`VISION_KINDS`: the shipped image classifiers: kind -> (weights file under
  ``evaluators/weights/``, data set name). The ``dse`` registry, the ``dataflow``
  simulator's traced networks and the training script all read this one table.
* :data:`CHAR_LM_FAMILY`: the sizes of the character-level GPT (``char_lm_s|m|l``): weights
  file, shape, learning rate and storage dtype; read by the ``char_lm`` evaluator, its
  schema and ``evaluators.train.train_char_lm``.
"""

from __future__ import annotations

from dataclasses import dataclass

FIDELITIES: tuple[str, ...] = ("proxy", "full", "gated")

VISION_KINDS: dict[str, tuple[str, str]] = {
    "glyph_cnn": ("glyph_cnn.safetensors", "glyphs"),
    "glyph_vit": ("glyph_vit.safetensors", "glyphs"),
    "digits": ("digits_cnn.safetensors", "digits"),
}


@dataclass(frozen=True)
class CharLMSize:
    """One member of the ``char_lm`` family (see :data:`CHAR_LM_FAMILY`).

    Attributes:
        file: weights file name in ``evaluators/weights``; d_model, n_layers, n_heads: shape
        (head width 32 in every member); lr: peak AdamW learning rate; dtype: storage
        dtype of the committed weights (``float16`` halves the repository size; they are
        loaded into float32).
    """

    file: str
    d_model: int
    n_layers: int
    n_heads: int
    lr: float
    dtype: str = "float32"


#: The ``char_lm`` model family: one architecture (:class:`CharGPT`, pre-LN, GELU MLP of 4d,
#: head width 32, context 64, the 104-symbol character vocabulary), three sizes, all trained
#: by ``python -m evaluators.train.train_char_lm --size NAME`` with one recipe (500 AdamW
#: steps of 32 windows of 64 characters = 1.02 M characters, ~2.4 passes over the training
#: topics; warm-up then cosine; seed 0). ``char_lm_s`` is the original ``char_lm``.
#: Learning rate: 1e-2 x 128 / d_model for s and m; for l that rule (5e-3) left the
#: training loss no lower than m's, and 3.5e-3 was kept (docs/evaluators.md, "Model family").
#: Parameters: s 431,720; m 1,832,168; l 6,388,328.
CHAR_LM_FAMILY: dict[str, CharLMSize] = {
    "char_lm_s": CharLMSize("char_lm.safetensors", 128, 2, 4, 1e-2),
    "char_lm_m": CharLMSize("char_lm_m.safetensors", 192, 4, 6, 1e-2 * 128 / 192, "float16"),
    "char_lm_l": CharLMSize("char_lm_l.safetensors", 256, 8, 8, 3.5e-3, "float16"),
}
