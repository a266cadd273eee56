"""ucm: query-aware block-sparse attention over a paged KV cache."""

__version__ = "0.1.0"
