"""tformer: the Transformer from its equations to a trained, evaluated, explained and served
text-to-text model.

``import tformer`` registers the own model with Hugging Face's ``AutoConfig`` and
``AutoModelForSeq2SeqLM`` (model_type ``"tformer"``).
"""

from tformer.engines import load
from tformer.generation import Seq2Seq
from tformer.hf import TformerConfig, TformerForConditionalGeneration
from tformer.model import TransformerConfig, build_transformer, config_for

__version__ = "0.1.0"

__all__ = [
    "Seq2Seq",
    "load",
    "TformerConfig",
    "TformerForConditionalGeneration",
    "TransformerConfig",
    "build_transformer",
    "config_for",
    "__version__",
]
