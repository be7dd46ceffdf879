"""radnode.node."""
