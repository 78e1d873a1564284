"""radixfleet.engine.models."""
