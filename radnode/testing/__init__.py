"""Helpers for tests and benchmarks that need real DICOM peers (never used in production).

:class:`OrthancServer` runs a throw-away Orthanc on free loopback ports.
"""

from radnode.testing.orthanc import OrthancError, OrthancServer, free_port

__all__ = ["OrthancError", "OrthancServer", "free_port"]
