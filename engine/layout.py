"""How model workers split a model: ranks to pipeline stages and tensor slices, layers to
stages, and under WAA ranks to the encode and the decode side; and the check that a model
can run on a layout.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.model_loader import LoadedModel
from engine.models.decoder_only import TP_ARCHS, num_layers


def split_evenly(total: int, parts: int) -> list[range]:
    """[0, total) in `parts` contiguous ranges; the first `total % parts` have one more."""
    base, extra = divmod(total, parts)
    starts = [p * base + min(p, extra) for p in range(parts + 1)]
    return [range(starts[p], starts[p + 1]) for p in range(parts)]


@dataclass(frozen=True)
class Layout:
    """One pipeline of TP groups over the ranks [first_rank, first_rank + num_workers)."""

    num_workers: int
    tp_degree: int
    first_rank: int = 0

    def __post_init__(self) -> None:
        if self.num_workers < 1 or self.tp_degree < 1:
            raise ValueError("the number of workers and the TP degree must be >= 1")
        if self.num_workers % self.tp_degree:
            raise ValueError(
                f"{self.num_workers} workers do not split into tensor-parallel groups of "
                f"{self.tp_degree}"
            )

    @property
    def num_stages(self) -> int:
        return self.num_workers // self.tp_degree

    @property
    def ranks(self) -> range:
        return range(self.first_rank, self.first_rank + self.num_workers)

    @property
    def last_rank(self) -> int:
        """Tensor rank 0 of the last stage: where the logits are computed."""
        return self.first_rank + (self.num_stages - 1) * self.tp_degree

    def stage(self, rank: int) -> int:
        return (rank - self.first_rank) // self.tp_degree

    def tp_rank(self, rank: int) -> int:
        """Which tensor slice of its stage `rank` computes."""
        return (rank - self.first_rank) % self.tp_degree

    def stage_ranks(self, stage: int) -> range:
        first = self.first_rank + stage * self.tp_degree
        return range(first, first + self.tp_degree)

    def layers(self, stage: int, total: int) -> range:
        """Contiguous layers of a stage; the first `total % stages` stages take one more."""
        return split_evenly(total, self.num_stages)[stage]

    def check(self, loaded: LoadedModel) -> None:
        """Raise ValueError with one clear line if `loaded` cannot run on this layout."""
        if self.num_workers == 1:
            return
        cfg = loaded.model.config
        tp = self.tp_degree
        if tp > 1 and cfg.model_type not in TP_ARCHS:
            raise ValueError(
                f"tensor parallelism supports {', '.join(sorted(TP_ARCHS))}, "
                f"not {cfg.model_type}; use pipeline stages (--tp 1)"
            )
        if tp > 1 and (cfg.num_key_value_heads % tp or cfg.intermediate_size % tp):
            raise ValueError(
                f"tensor parallelism {self.tp_degree} must divide the KV heads "
                f"({cfg.num_key_value_heads}) and the MLP width ({cfg.intermediate_size})"
            )
        depth = min(
            num_layers(loaded), getattr(cfg, "num_decoder_layers", None) or num_layers(loaded)
        )
        if self.num_stages > depth:
            raise ValueError(f"{self.num_stages} pipeline stages exceed the model's {depth} layers")


@dataclass(frozen=True)
class Allocation:
    """Which ranks run which phase. Without encode workers every rank runs both, one
    Layout over the group; WAA splits the group (paper section 4.1): the first ranks, the
    driver among them, decode, the last `encode_workers` encode, each side a Layout of its
    own with the same TP degree:

        5 workers, 2 encode, tp 1:   decode: ranks 0 1 2 (3 stages)   encode: ranks 3 4
    """

    num_workers: int
    tp_degree: int
    encode_workers: int = 0

    def __post_init__(self) -> None:
        Layout(self.num_workers, self.tp_degree)  # raises on a group that cannot be built
        if not 0 <= self.encode_workers < self.num_workers:
            raise ValueError(
                f"{self.encode_workers} encode workers leave no decode worker among "
                f"{self.num_workers}"
            )
        if self.encode_workers % self.tp_degree:
            raise ValueError(
                f"{self.encode_workers} encode and {self.num_workers - self.encode_workers} "
                f"decode workers must each split into tensor-parallel groups of {self.tp_degree}"
            )

    @property
    def decode(self) -> Layout:
        """The driver's side: all ranks without encode workers."""
        return Layout(self.num_workers - self.encode_workers, self.tp_degree)

    @property
    def encode(self) -> Layout | None:
        if not self.encode_workers:
            return None
        first = self.num_workers - self.encode_workers
        return Layout(self.encode_workers, self.tp_degree, first_rank=first)

    @property
    def sides(self) -> list[Layout]:
        return [self.decode] + ([] if self.encode is None else [self.encode])

    def side(self, rank: int) -> Layout:
        return next(layout for layout in self.sides if rank in layout.ranks)

    def check(self, loaded: LoadedModel) -> None:
        """Raise ValueError with one clear line if `loaded` cannot run on this allocation."""
        for layout in self.sides:
            layout.check(loaded)
