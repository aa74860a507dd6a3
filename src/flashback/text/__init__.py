"""The text side of FlashBack: tokenizing, corpora and the BM25 index. Nothing here imports torch."""
