"""Data: TFDS sources, SentencePiece tokenizer, packed grain batches."""

from qvjax.data.options import validate_config
from qvjax.data.pipeline import make_eval_batches
from qvjax.data.pipeline import make_train_iterator
from qvjax.data.pipeline import train_documents
from qvjax.data.sources import check_sources
from qvjax.data.sources import get_source
from qvjax.data.tokenizer import check_tokenizer
from qvjax.data.tokenizer import check_vocab
from qvjax.data.tokenizer import get_tokenizer
from qvjax.data.tokenizer import Tokenizer
from qvjax.data.tokenizer import tokenizer_fingerprint
from qvjax.data.tokenizer import tokenizer_vocab_size

__all__ = [
    'Tokenizer',
    'check_sources',
    'check_tokenizer',
    'check_vocab',
    'get_source',
    'get_tokenizer',
    'make_eval_batches',
    'make_train_iterator',
    'tokenizer_fingerprint',
    'tokenizer_vocab_size',
    'train_documents',
    'validate_config',
]
