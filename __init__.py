"""radixfleet: LLM serving from a laptop to a Kubernetes fleet.

Subpackages: ``radixfleet.engine`` (SGLang-compatible inference engine),
``radixfleet.router`` (cache-aware load balancer), ``radixfleet.kernels`` (triton
kernels), ``radixfleet.operator`` (kopf operator for ``InferenceService``).
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    # `radixfleet.Engine` without importing torch at package import time.
    if name == "Engine":
        from radixfleet.engine.engine import Engine

        return Engine
    raise AttributeError(name)
