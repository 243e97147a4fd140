"""The execution schedule: the value the planner produces and the engine executes.

A `Schedule` names a policy and its control knobs (paper section 4.2). It is frozen:
a new plan is a new value, applied by the engine at a safe boundary.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Policy(enum.StrEnum):
    RRA = "rra"  # round-robin allocation: encode phase of B_E, then N_D decode iterations
    WAA_C = "waa_c"  # workload-aware allocation, encode/decode workers split by compute
    WAA_M = "waa_m"  # workload-aware allocation, split by memory
    STATIC = "static"  # FasterTransformer-like: a batch decodes until its longest member ends
    CONTINUOUS = "continuous"  # ORCA/vLLM-like iteration-level scheduling

    @property
    def is_waa(self) -> bool:
        """Encode and decode on separate workers (WAA-C and WAA-M differ in the split)."""
        return self in (Policy.WAA_C, Policy.WAA_M)


@dataclass(frozen=True)
class Schedule:
    """A policy with its knobs, plus what the simulator predicted for it (if planned).

    encode_batch:        B_E, queries admitted per encoding phase (static: the batch size).
    decode_iters:        N_D, decoding iterations between two encoding phases (RRA only).
    max_batch:           cap on the running decode batch (continuous: its only knob).
    decode_microbatches: WAA's decoder micro-batches.
    tp_degree, tp_workers: partial tensor parallelism: degree, and how many workers it covers.
    num_workers:         devices the schedule spans; encode_workers is WAA's encode share.
    """

    policy: Policy
    encode_batch: int
    decode_iters: int = 1
    max_batch: int = 256
    decode_microbatches: int = 1
    tp_degree: int = 1
    tp_workers: int = 0
    num_workers: int = 1
    encode_workers: int = 0
    predicted_throughput_req_s: float | None = None
    predicted_latency_s: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.policy, Policy):
            object.__setattr__(self, "policy", Policy(self.policy))
        for name in (
            "encode_batch",
            "decode_iters",
            "max_batch",
            "decode_microbatches",
            "tp_degree",
            "num_workers",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"Schedule.{name} must be >= 1, got {getattr(self, name)}")
        if self.tp_workers < 0 or self.tp_workers % self.tp_degree:
            raise ValueError(
                f"Schedule.tp_workers ({self.tp_workers}) must be a non-negative multiple "
                f"of tp_degree ({self.tp_degree})"
            )
        if self.tp_workers > self.num_workers:
            raise ValueError("Schedule.tp_workers cannot exceed num_workers")
        if self.policy.is_waa and not 0 < self.encode_workers < self.num_workers:
            raise ValueError("a WAA schedule needs 0 < encode_workers < num_workers")
        if not self.policy.is_waa and self.encode_workers:
            raise ValueError("encode_workers applies to WAA schedules only")

    def describe(self) -> str:
        """Short human-readable form, e.g. `rra(B_E=16, N_D=8)`."""
        knobs = {
            Policy.RRA: f"B_E={self.encode_batch}, N_D={self.decode_iters}",
            Policy.STATIC: f"batch={self.encode_batch}",
            Policy.CONTINUOUS: f"max_batch={self.max_batch}",
        }.get(
            self.policy,
            f"B_E={self.encode_batch}, micro={self.decode_microbatches}, "
            f"enc={self.encode_workers}/{self.num_workers}",
        )
        if self.tp_degree > 1:
            knobs += f", TP={self.tp_degree}x{self.tp_workers}"
        return f"{self.policy.value}({knobs})"
