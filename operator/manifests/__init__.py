"""Pure builders: a parsed InferenceService spec → the manifests it needs.

``children.py`` assembles the complete desired state (``build_children``) from the engine
workloads (``engine.py``), the Hub model download (``model.py``), the router
(``router.py``) and the monitoring objects (``monitoring.py``). Nothing here talks to the
Kubernetes API; the reconciler applies what these return.
"""
