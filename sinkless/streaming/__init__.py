"""StreamingLLM for Hugging Face causal LMs (Xiao et al. 2024, "Efficient Streaming Language Models with
Attention Sinks"): a sink + window KV cache on the transformers 5 Cache API, streaming perplexity and
generation. See docs/STREAMING.md."""

from sinkless.streaming.cache import SinkCache, check_streamable, streaming_forward
from sinkless.streaming.generate import Chat, Sampling, generate_tokens
from sinkless.streaming.ppl import Mode, PplConfig, PplResult, perplexity, plot_running_ppl

__all__ = [
    "SinkCache",
    "streaming_forward",
    "check_streamable",
    "Chat",
    "Sampling",
    "generate_tokens",
    "Mode",
    "PplConfig",
    "PplResult",
    "perplexity",
    "plot_running_ppl",
]
