"""radixfleet.router."""
