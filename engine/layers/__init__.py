"""radixfleet.engine.layers."""
