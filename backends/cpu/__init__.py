"""CPU backend: C++/OpenMP kernels (AVX2 popcount) with the pure-torch path as fallback."""
