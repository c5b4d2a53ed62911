"""The data pipeline: tokenizers, document sources, blending, packing, prefetching."""
from pretrain.data.corpus import embedded_corpus, load_documents
from pretrain.data.errors import DataError
from pretrain.data.loader import TokenBatches, build_data, eval_batches
from pretrain.data.packing import Batch
from pretrain.data.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer, load_tokenizer

__all__ = [
    "Batch", "ByteTokenizer", "DataError", "HFTokenizer", "TokenBatches", "Tokenizer",
    "build_data", "embedded_corpus", "eval_batches", "load_documents", "load_tokenizer",
]
