"""radnode.models."""
