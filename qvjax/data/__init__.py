"""Data: TFDS sources, SentencePiece tokenizer, packed grain batches."""

from qvjax.data.pipeline import make_eval_batches
from qvjax.data.pipeline import make_train_iterator
from qvjax.data.sources import get_source
from qvjax.data.tokenizer import get_tokenizer
from qvjax.data.tokenizer import Tokenizer

__all__ = [
    'Tokenizer',
    'get_source',
    'get_tokenizer',
    'make_eval_batches',
    'make_train_iterator',
]
