"""The ``apex`` settings of a run, validated once, with the unit counts they imply."""

import math
from dataclasses import asdict, dataclass
from typing import Any, Mapping, Optional


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


@dataclass(frozen=True)
class ApexSettings:
    """What APEX expands and trains.

    Args:
        ratio (float): K as a fraction of each layer's units (heads or KV groups,
            and FFN channels): |P| = |N| = round(ratio * units). In (0, 0.5].
            The paper's best for instruction tuning is 0.1875.
        tuned_ratio_heads (Optional[float]): with ``delta``, the fraction of head
            units that get the dense delta (N, P and the next-lowest E). At least
            ``2 * ratio``. None: only N and P.
        tuned_ratio_channels (Optional[float]): the same for FFN channels.
        delta (bool): train a zero-initialised dense delta on the tuned units'
            rows/columns of q, k, v, output_proj, w1, w3, w2.
        train_embeddings (bool): also train the token embeddings and output head.
    """

    ratio: float = 0.1875
    tuned_ratio_heads: Optional[float] = None
    tuned_ratio_channels: Optional[float] = None
    delta: bool = False
    train_embeddings: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.ratio, (int, float)) or not 0 < self.ratio <= 0.5:
            raise ValueError(
                f"apex.ratio={self.ratio!r} is out of range: it must be in (0, 0.5] "
                "(P and N each take this fraction of units and must not overlap); "
                "the paper uses 0.1875"
            )
        for name in ("tuned_ratio_heads", "tuned_ratio_channels"):
            value = getattr(self, name)
            if value is None:
                continue
            if not isinstance(value, (int, float)) or not 2 * self.ratio <= value <= 1:
                raise ValueError(
                    f"apex.{name}={value!r} is out of range: it must be in "
                    f"[2 * apex.ratio, 1] = [{2 * self.ratio:g}, 1], since N and P are "
                    "always tuned; set it to null to tune only N and P"
                )

    @classmethod
    def from_config(cls, cfg: Optional[Mapping[str, Any]]) -> "ApexSettings":
        """Build from a config mapping, rejecting unknown keys by name."""
        cfg = dict(cfg or {})
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise ValueError(
                f"unknown apex settings {unknown}; the model settings are {sorted(known)}"
            )
        return cls(**cfg)

    def to_dict(self) -> dict:
        return asdict(self)

    def expanded_units(self, num_units: int, kind: str) -> int:
        """K for a layer with ``num_units`` units of ``kind`` ('heads' or 'channels')."""
        k = _round_half_up(self.ratio * num_units)
        if k < 1:
            raise ValueError(
                f"apex.ratio={self.ratio} selects no {kind} out of {num_units}; "
                f"raise apex.ratio to at least {1 / num_units:.4g}"
            )
        if 2 * k > num_units:
            raise ValueError(
                f"apex.ratio={self.ratio} needs 2 * {k} {kind} for P and N but the layer has {num_units}"
            )
        return k

    def extra_units(self, num_units: int, kind: str) -> int:
        """|E|: tuned units beyond N and P (0 without the delta)."""
        tuned_ratio = self.tuned_ratio_heads if kind == "heads" else self.tuned_ratio_channels
        if not self.delta or tuned_ratio is None:
            return 0
        tuned = _round_half_up(tuned_ratio * num_units)
        return max(tuned - 2 * self.expanded_units(num_units, kind), 0)
