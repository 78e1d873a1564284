"""radixfleet.operator."""
