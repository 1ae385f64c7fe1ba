"""Native CPU kernels for the decode step (C, built on first use, loaded with ctypes).

See ``decode_kernels.c`` for what they compute and ``build.py`` for how they
are built and cached. :func:`native_kernels` returns None where they cannot be
used; callers then run everything through torch.
"""

from streamgen.native.build import NativeUnavailableError, native_disabled
from streamgen.native.kernels import NativeKernels, native_kernels

__all__ = ["NativeKernels", "NativeUnavailableError", "native_disabled", "native_kernels"]
