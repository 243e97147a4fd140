"""Numba kernels: the simulator's hot loops, over arrays and scalars only.

Typed wrappers live in `adaptive.simulator`; nothing here knows about dataclasses. One
module per family, each taking arrays and scalars only:

    cost      scenario-vector layout (S_*), the parallel Layout, layer / all-reduce /
              stage / pass times, weight bytes, the RRA phase bubble; everything below
              builds on it
    exegpt    rra_point, waa_point: ExeGPT's policies in closed form
    baseline  static_point (FasterTransformer), continuous_point (ORCA/vLLM)
    des       rra_des, continuous_des: discrete-event checks of the closed forms
"""

from adaptive.kernels.baseline import continuous_point, expected_batch_max, static_point
from adaptive.kernels.cost import *  # noqa: F403  (the S_* layout and the cost model)
from adaptive.kernels.cost import Point, layer_time
from adaptive.kernels.des import continuous_des, rra_des
from adaptive.kernels.exegpt import rra_point, waa_point

__all__ = [
    "Point",
    "continuous_des",
    "continuous_point",
    "expected_batch_max",
    "layer_time",
    "rra_des",
    "rra_point",
    "static_point",
    "waa_point",
]
