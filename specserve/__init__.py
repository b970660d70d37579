"""specserve: an LLM inference and serving engine where every step is draft-then-verify."""

from specserve.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from specserve.sampling_params import SamplingParams


def __getattr__(name: str):
    # LLM pulls in torch and transformers; importing it lazily keeps `import specserve` light.
    if name == "LLM":
        from specserve.llm import LLM

        return LLM
    raise AttributeError(name)


__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob", "RequestMetrics"]
