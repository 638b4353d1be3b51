"""kiln: build once, serve fast. LLM inference for NVIDIA GPUs (and CPUs)."""
from kiln.config import SamplingParams
from kiln.outputs import CompletionOutput, Logprob, RequestOutput

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob", "__version__"]


def __getattr__(name: str):
    # Importing LLM pulls in torch; keep `import kiln` light for the CLI and the router.
    if name == "LLM":
        from kiln.api import LLM
        return LLM
    raise AttributeError(name)
