"""radixfleet.engine.memory."""
