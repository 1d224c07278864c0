"""The flowtap relay engine: listeners, upstream connect, per-flow relay and flow events."""
