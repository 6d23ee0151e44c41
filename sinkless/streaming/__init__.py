"""StreamingLLM for Hugging Face causal LMs (Xiao et al. 2024, "Efficient Streaming Language Models with
Attention Sinks"): a sink + window KV cache that drops into ``model.generate()``, streaming perplexity,
and multi-turn chat in constant memory. See docs/STREAMING.md."""

from sinkless.streaming.architecture import StreamSpec, check_streamable
from sinkless.streaming.cache import SinkCache
from sinkless.streaming.generate import Chat, complete
from sinkless.streaming.ppl import Mode, PplConfig, PplResult, perplexity, plot_running_ppl

__all__ = [
    "SinkCache",
    "check_streamable",
    "StreamSpec",
    "Chat",
    "complete",
    "Mode",
    "PplConfig",
    "PplResult",
    "perplexity",
    "plot_running_ppl",
]
