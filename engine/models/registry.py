"""Architecture name (``config.json`` ``architectures[0]``) → model class."""

from __future__ import annotations

from torch import nn

from radixfleet.engine.models.bert import BertEmbeddingModel
from radixfleet.engine.models.decoder_embedding import DECODER_BASE_ARCHS, DecoderEmbeddingModel
from radixfleet.engine.models.gemma import Gemma2ForCausalLM, Gemma3ForCausalLM
from radixfleet.engine.models.llama import LlamaForCausalLM, Qwen3ForCausalLM
from radixfleet.engine.models.moe import MixtralForCausalLM, Qwen2MoeForCausalLM, Qwen3MoeForCausalLM
from radixfleet.engine.models.phi3 import Phi3ForCausalLM

MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    "Gemma2ForCausalLM": Gemma2ForCausalLM,
    "Gemma3ForCausalLM": Gemma3ForCausalLM,
    "Gemma3ForConditionalGeneration": Gemma3ForCausalLM,  # the text model alone (text_config.py)
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,  # q/k/v bias comes from the config
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "Qwen2MoeForCausalLM": Qwen2MoeForCausalLM,
    "Qwen3MoeForCausalLM": Qwen3MoeForCausalLM,
    "MixtralForCausalLM": MixtralForCausalLM,
    "Phi3ForCausalLM": Phi3ForCausalLM,
}

# Embedding models: one forward per request, no radix cache (``EmbeddingScheduler``):
# BERT encoders, and decoders without an LM head (``decoder_embedding.py``).
EMBEDDING_REGISTRY: dict[str, type[nn.Module]] = {
    "BertModel": BertEmbeddingModel,
    **dict.fromkeys(DECODER_BASE_ARCHS, DecoderEmbeddingModel),
}


def is_embedding_architecture(architecture: str) -> bool:
    return architecture in EMBEDDING_REGISTRY


def embedding_model_class(architecture: str, is_embedding: bool) -> type[nn.Module] | None:
    """The embedding model class for ``architecture`` (a generation architecture serves
    embeddings with ``is_embedding``); None for a generation model."""
    if architecture in EMBEDDING_REGISTRY:
        return EMBEDDING_REGISTRY[architecture]
    if is_embedding and architecture in MODEL_REGISTRY:
        return DecoderEmbeddingModel
    return None


def decoder_class(architecture: str) -> type[nn.Module]:
    """The generation class whose decoder an embedding folder of ``architecture`` is."""
    return get_model_class(DECODER_BASE_ARCHS.get(architecture, architecture))


def get_model_class(architecture: str) -> type[nn.Module]:
    """The generation model class for ``architecture``."""
    try:
        return MODEL_REGISTRY[architecture]
    except KeyError:
        raise ValueError(f"unsupported architecture {architecture!r}; supported: "
                         f"{', '.join(sorted(MODEL_REGISTRY))}, and for embeddings "
                         f"{', '.join(sorted(EMBEDDING_REGISTRY))}") from None
