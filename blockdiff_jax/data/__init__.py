"""Data layer: tokenizers, corpora, synthetic tasks and batch pipelines."""

from blockdiff_jax.data.config import default_data_config
from blockdiff_jax.data.corpora import load_documents
from blockdiff_jax.data.pipeline import build_dataset
from blockdiff_jax.data.pipeline import DatasetIterator
from blockdiff_jax.data.tokenizers import get_tokenizer
