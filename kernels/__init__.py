"""radixfleet.kernels."""
