"""radixfleet.engine."""
