"""radixfleet.kernels."""


def dot_precision(dtype) -> str:
    """``tl.dot`` input precision for operands of ``dtype``: exact fp32 products ("ieee") for
    fp32 models, so that fp32 runs agree with the other backends beyond tf32's 10-bit
    mantissa; the value is ignored for 16-bit operands."""
    import torch

    return "ieee" if dtype == torch.float32 else "tf32"
