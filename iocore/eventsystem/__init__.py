"""The event system: continuations, events, the per-process EThread loop, IOBuffers and VIOs."""
