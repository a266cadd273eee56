"""The CPU backend runs everywhere torch does; whether its C++ kernels compiled is reported by
`CpuOps.native_error` (the backend falls back to torch for them)."""


def probe() -> str | None:
    return None
