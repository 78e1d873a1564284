"""Operator settings (one frozen dataclass; the CLI flags come from it)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class OperatorConfig:
    resync_seconds: float = 30.0  # level-based resync of children and router worker lists
    drain_timeout_seconds: float = 120.0  # scale-down: longest wait for in-flight requests
    drain_poll_seconds: float = 0.5
    autoscale_interval_seconds: float = 15.0
    retry_delay_seconds: float = 10.0  # TemporaryError backoff for API/router failures
    group_restart_backoff_seconds: float = 30.0  # multi-node: least time between restarts of one group
    # API server override (tests against KMock; out-of-cluster without a kubeconfig).
    server: str | None = None
    # Hub mirror (HF_ENDPOINT) for InferenceServices whose model.hub names no endpoint.
    hub_endpoint: str | None = None

    def __post_init__(self) -> None:
        for name in ("resync_seconds", "drain_timeout_seconds", "drain_poll_seconds", "autoscale_interval_seconds", "retry_delay_seconds",
                     "group_restart_backoff_seconds"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.hub_endpoint is not None and not self.hub_endpoint.startswith(("http://", "https://")):
            raise ValueError(f"hub_endpoint must be an http(s) URL, got {self.hub_endpoint!r}")
