"""gru-nlp: small, fast text classification with a bidirectional GRU and attention pooling."""

from gru_nlp.api import Explanation, Prediction, TextClassifier
from gru_nlp.model import AttentionPooling, BiGRUClassifier, ClassifierOutput

__version__ = "0.1.0"

__all__ = [
    "AttentionPooling",
    "BiGRUClassifier",
    "ClassifierOutput",
    "Explanation",
    "Prediction",
    "TextClassifier",
    "__version__",
]
