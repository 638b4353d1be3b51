"""The kernels' side of programmatic dependent launch (kiln.kernels.backend.pdl_launch)."""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def pdl_wait(PDL: tl.constexpr):
    """Under PDL: wait until the previous kernel has finished and its writes are visible, then
    let the next kernel launch (it may start fetching what does not depend on this one, such
    as its weights). Nothing may be written, nor anything an earlier kernel writes be read,
    before this call."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
