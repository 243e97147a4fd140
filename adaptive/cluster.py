"""The cluster a plan targets: device count, node size, memory, and links.

Profiles time one layer on one device; tensor-parallel all-reduces and pipeline sends are
added from link bandwidth and latency (the paper's XProfiler measures them; one device
cannot). Presets follow the paper's two clusters (Table 2) and an H100 node:

- a100: 8 x A100-80GB per node, NVLink 3 (300 GB/s per direction), 8 x 200 Gb HDR
  InfiniBand per node (25 GB/s per GPU).
- a40: 8 x A40-48GB per node, PCIe 4.0 x16 (~25 GB/s), 100 Gb InfiniBand per node.
- h100: 8 x H100-80GB per node, NVLink 4 (450 GB/s per direction), 400 Gb NDR per GPU.

Compute comes from the profile. Each preset also names its accelerator's datasheet
ceilings (`Device`), so `adaptive.roofline.on_device` can carry a profile measured on one
card to the cluster's card; `plan` leaves the profile as measured unless asked.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from adaptive.errors import PlanningError

GB = 1e9
GIB = 2**30


@dataclass(frozen=True)
class Link:
    """A point-to-point link: bandwidth per direction (bytes/s) and per-message latency (s)."""

    bandwidth: float
    latency: float

    def __post_init__(self) -> None:
        if self.bandwidth <= 0 or self.latency < 0:
            raise PlanningError("a link needs bandwidth > 0 and latency >= 0")


@dataclass(frozen=True)
class Device:
    """Datasheet ceilings of one accelerator: dense bf16 tensor FLOP/s, memory bytes/s."""

    name: str
    peak_flops: float
    memory_bandwidth: float

    def __post_init__(self) -> None:
        if self.peak_flops <= 0 or self.memory_bandwidth <= 0:
            raise PlanningError("a device needs positive peak FLOP/s and memory bandwidth")


# Dense (no sparsity) bf16 tensor-core peaks and memory bandwidth from NVIDIA datasheets.
DEVICES: dict[str, Device] = {
    "h100": Device("H100-SXM5-80GB", 989e12, 3.35e12),
    "a100": Device("A100-SXM4-80GB", 312e12, 2.039e12),
    "a40": Device("A40-48GB", 149.7e12, 696e9),
}


@dataclass(frozen=True)
class Cluster:
    """Devices, grouped into nodes; `memory_bytes` is per device, before the reserve.

    memory_reserve: fraction kept for activations and workspace (not weights or KV).
    host: the device-host-device path WAA's KV hand-over takes (paper: GPU -> CPU -> GPU).
    device: the accelerator's ceilings, when known (presets); None for a custom cluster.
    """

    num_devices: int
    devices_per_node: int
    memory_bytes: float
    intra: Link
    inter: Link
    host: Link = Link(25 * GB, 10e-6)
    memory_reserve: float = 0.1
    name: str = "custom"
    device: Device | None = None

    def __post_init__(self) -> None:
        if self.num_devices < 1 or self.devices_per_node < 1:
            raise PlanningError("a cluster needs at least one device and one device per node")
        if self.memory_bytes <= 0 or not 0 <= self.memory_reserve < 1:
            raise PlanningError("device memory must be positive and the reserve in [0, 1)")

    @property
    def usable_memory_bytes(self) -> float:
        return self.memory_bytes * (1.0 - self.memory_reserve)

    def with_devices(self, num_devices: int) -> Cluster:
        return replace(self, num_devices=num_devices)


PRESETS: dict[str, Cluster] = {
    name: Cluster(8, 8, memory, intra, inter, name=name, device=DEVICES[name])
    for name, memory, intra, inter in (
        ("a100", 80 * GIB, Link(300 * GB, 5e-6), Link(25 * GB, 10e-6)),
        ("a40", 48 * GIB, Link(25 * GB, 10e-6), Link(12.5 * GB, 10e-6)),
        ("h100", 80 * GIB, Link(450 * GB, 5e-6), Link(50 * GB, 10e-6)),
    )
}


def preset_cluster(name: str, num_devices: int) -> Cluster:
    """A preset cluster sized to num_devices."""
    base = PRESETS.get(name.lower())
    if base is None:
        raise PlanningError(f"unknown cluster {name!r}; expected one of {', '.join(PRESETS)}")
    return base.with_devices(num_devices)
