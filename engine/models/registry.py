"""Architecture name (``config.json`` ``architectures[0]``) → model class."""

from __future__ import annotations

from torch import nn

from radixfleet.engine.models.bert import BertEmbeddingModel
from radixfleet.engine.models.gemma import Gemma2ForCausalLM, Gemma3ForCausalLM
from radixfleet.engine.models.llama import LlamaForCausalLM, Qwen3ForCausalLM
from radixfleet.engine.models.moe import MixtralForCausalLM, Qwen2MoeForCausalLM, Qwen3MoeForCausalLM
from radixfleet.engine.models.phi3 import Phi3ForCausalLM

MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    "Gemma2ForCausalLM": Gemma2ForCausalLM,
    "Gemma3ForCausalLM": Gemma3ForCausalLM,
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,  # q/k/v bias comes from the config
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "Qwen2MoeForCausalLM": Qwen2MoeForCausalLM,
    "Qwen3MoeForCausalLM": Qwen3MoeForCausalLM,
    "MixtralForCausalLM": MixtralForCausalLM,
    "Phi3ForCausalLM": Phi3ForCausalLM,
}

# Embedding models: one bidirectional forward per request, no KV cache (``EmbeddingScheduler``).
EMBEDDING_REGISTRY: dict[str, type[nn.Module]] = {
    "BertModel": BertEmbeddingModel,
}


def is_embedding_architecture(architecture: str) -> bool:
    return architecture in EMBEDDING_REGISTRY


def get_model_class(architecture: str) -> type[nn.Module]:
    """The generation model class for ``architecture``."""
    try:
        return MODEL_REGISTRY[architecture]
    except KeyError:
        raise ValueError(f"unsupported architecture {architecture!r}; supported: "
                         f"{', '.join(sorted(MODEL_REGISTRY))}, and for embeddings "
                         f"{', '.join(sorted(EMBEDDING_REGISTRY))}") from None
