"""radnode.node: the DICOM listener (C-STORE/C-ECHO SCP), durable ingest, series completion,
routing rules, audit log and metrics.

The listener never imports torch or MONAI. The pipeline subscribes to completion with
``StorageNode.subscribe(callback)`` (or ``SeriesCompletion.subscribe``), where ``callback``
receives a :class:`~radnode.node.completion.SeriesCompleted`.
"""

from radnode.node.completion import CompletionSubscriber, SeriesCompleted, SeriesCompletion
from radnode.node.routing import RoutingDecision, evaluate
from radnode.node.series_attributes import SeriesAttributes

__all__ = [
    "CompletionSubscriber",
    "RoutingDecision",
    "SeriesCompleted",
    "SeriesAttributes",
    "SeriesCompletion",
    "evaluate",
]
