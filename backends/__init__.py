"""ucm backends: implementations of `ucm.ops.SparseOps`, installed as the `ucm_backends` package."""
