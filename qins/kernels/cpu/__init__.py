"""Native CPU kernels of ``qins::linear`` (C++ sources shipped in the package; see build.py)."""
