"""Per-op-family channel handlers for the dependency graph."""
