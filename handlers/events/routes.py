"""The events routes (temporary re-export while the domain is reshaped)."""

from handlers.events.analytics import get_counts, live
from handlers.events.ingest import post_events

__all__ = ["get_counts", "live", "post_events"]
