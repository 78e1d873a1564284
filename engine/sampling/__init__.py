"""radixfleet.engine.sampling."""
