"""radnode.pipeline."""
