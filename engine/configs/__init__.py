"""radixfleet.engine.configs."""
