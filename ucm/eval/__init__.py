"""Long-context accuracy evaluation: task sources and scoring for `ucm eval`."""
