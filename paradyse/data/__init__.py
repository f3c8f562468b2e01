"""Data sources and batching of the trainer (DESIGN 8). Stdlib and numpy only.

Sources (`sources`): the embedded default corpus (the running Python's standard library sources,
byte tokens), jsonl or text files, instruction records with the prompt masked out of the loss
(`instruct`), and synthetic length distributions, tokenized by the byte or a local Hugging Face
tokenizer (`tokenizers`; a folder or a GGUF file). `GlobalBatches` (`batching`) turns a source
into the global batch of every step, fixed by the seed and independent of the world size;
`assign_to_dp` balances a batch's sequences over dp groups by predicted cost and `micro_batches`
packs one group's share into micro-batches by a token budget per rank.
"""

from .batching import Batch, GlobalBatches, assign_to_dp, micro_batches, run_stream
from .errors import DataError
from .instruct import InstructCorpus, target_count
from .sources import FileCorpus, Source, StdlibCorpus, SyntheticLengths, open_source
from .tokenizers import ByteTokenizer, HFTokenizer, Tokenizer, load_tokenizer

__all__ = [
    "Batch",
    "ByteTokenizer",
    "DataError",
    "FileCorpus",
    "GlobalBatches",
    "HFTokenizer",
    "InstructCorpus",
    "Source",
    "StdlibCorpus",
    "SyntheticLengths",
    "Tokenizer",
    "assign_to_dp",
    "load_tokenizer",
    "micro_batches",
    "open_source",
    "run_stream",
    "target_count",
]
