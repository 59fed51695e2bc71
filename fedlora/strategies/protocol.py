"""The round protocol's shared vocabulary, light enough for the launcher's check (no torch).

:class:`Uploads` is what a method's replies can be: its weights only (HetLoRA, FlexLoRA), its
weights or — with run-config ``upload=delta`` — its update (trained − received: the
weight-averaging methods), or updates always (FLASC, LoRA-A2). A run's replies are updates
exactly when :meth:`Uploads.replies_are_deltas` says so; the train message tells the node
(``upload``: ``delta`` or ``weights``).
"""

from __future__ import annotations

from enum import Enum


class Uploads(str, Enum):
    WEIGHTS = "weights"   # the method aggregates weights: upload=delta is refused
    EITHER = "either"     # weights, or the update with upload=delta (the server adds the mean)
    UPDATES = "updates"   # the replies are updates already: upload=delta changes nothing

    def replies_are_deltas(self, upload: str) -> bool:
        """Whether a run with run-config ``upload`` gets updates from this method's nodes."""
        return self is Uploads.UPDATES or (self is Uploads.EITHER and upload == "delta")
