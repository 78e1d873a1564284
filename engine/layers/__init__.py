"""Layer modules shared by every model; tensor-parallel aware."""
