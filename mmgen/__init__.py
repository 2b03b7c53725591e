"""mmgen: one LLaMA-style transformer that reads and writes interleaved text and images."""

__version__ = "0.1.0"
