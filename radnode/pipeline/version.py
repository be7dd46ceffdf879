"""The pipeline version, importable without the chain's heavy dependencies.

Bumped whenever a change alters what the chain produces; it is part of derived output
UIDs and of the "already processed" check, so new outputs never collide with old ones.
The listener and the queue read it without importing SimpleITK, highdicom or torch.
"""

PIPELINE_VERSION = "1"
