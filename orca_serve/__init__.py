"""orca-serve: iteration-level scheduling, selective batching and a paged KV pool."""
from orca_serve.entrypoints.llm import LLM
from orca_serve.outputs import RequestOutput
from orca_serve.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput"]
__version__ = "0.1.0"
