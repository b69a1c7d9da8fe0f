"""Events: ingestion, the writer, counters, partitions, analytics, the live stream, the
outbox relay."""
