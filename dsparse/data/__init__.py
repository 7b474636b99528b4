"""dsparse data pipeline: text source -> tokenizer -> packed blocks -> resumable data-parallel loaders.

Entry point for the launcher::

    from dsparse.data import build_data
    train, val, tokenizer = build_data("default", None, seq_len=512, rank=rank, world_size=dp_size,
                                       micro_batch_size=mbs, seed=seed, barrier=torch.distributed.barrier)
"""
from .build import Data, build_data
from .cache import default_cache_dir
from .corpus import DEFAULT_MAX_MB, default_corpus, stdlib_files
from .loader import EvalLoader, TrainLoader
from .packing import Packed, PackedBlocks, pack_corpus
from .sources import load_text_dataset
from .tokenizer import load_tokenizer, tokenizer_fingerprint, trained_tokenizer

__all__ = [
    "DEFAULT_MAX_MB",
    "Data",
    "EvalLoader",
    "Packed",
    "PackedBlocks",
    "TrainLoader",
    "build_data",
    "default_cache_dir",
    "default_corpus",
    "load_text_dataset",
    "load_tokenizer",
    "pack_corpus",
    "stdlib_files",
    "tokenizer_fingerprint",
    "trained_tokenizer",
]
