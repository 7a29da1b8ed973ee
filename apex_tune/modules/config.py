"""The ``apex`` settings of a run, validated once, with the unit counts they imply."""

import math
from dataclasses import asdict, dataclass
from typing import Any, List, Mapping, Optional, Tuple


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


UNIT_KINDS = ("heads", "channels")


def _ceil_significant(x: float, digits: int = 4) -> float:
    """``x`` rounded up to ``digits`` significant digits (a printed minimum that works)."""
    scale = 10 ** (digits - 1 - math.floor(math.log10(x)))
    return math.ceil(x * scale) / scale


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


@dataclass(frozen=True)
class ApexSettings:
    """What APEX expands and trains.

    Args:
        ratio (float): K as a fraction of each layer's units, for heads (KV groups)
            and FFN channels alike unless ``ratio_heads``/``ratio_channels`` say
            otherwise: |P| = |N| = round(ratio * units). In [0, 0.5]; 0 switches
            expansion off. The paper's best for instruction tuning is 0.1875.
        ratio_heads (Optional[float]): K for head units (KV groups); None: ``ratio``.
            0 switches heads expansion off: attention is left as it is (no
            operators, no delta). A model with few KV groups needs its own
            value here (2 groups: at least 0.25; 3 groups: at least 1/6).
        ratio_channels (Optional[float]): K for FFN channels; None: ``ratio``.
            0 switches channels expansion off.
        tuned_ratio_heads (Optional[float]): with ``delta``, the fraction of head
            units that get the dense delta (N, P and the next-lowest E). At least
            twice the heads ratio. None: only N and P.
        tuned_ratio_channels (Optional[float]): the same for FFN channels.
        delta (bool): train a zero-initialised dense delta on the tuned units'
            rows/columns of q, k, v, output_proj, w1, w3, w2.
        train_embeddings (bool): also train the token embeddings and output head.
        quantize_base (bool): keep the frozen base weights of every layer's
            attention and FFN projections in 4-bit NF4 (torchao), as torchtune's
            QLoRA builders do; embeddings, norms and the output head stay in the
            run dtype. Fusion is then deferred: a stage boundary freezes the
            stage's operators instead of re-quantizing folded weights, and the
            plain checkpoint is folded once, in fp32, from the dequantized base
            (see :mod:`apex_tune.modules.nf4`). Each projection's element count
            must be a multiple of 64 * 256 (NF4 block and scaler block).
        contiguous_channels (bool): keep each layer's FFN channels physically
            ordered with the tuned ones first (N, P, E, then the rest): a
            selection permutes the rows of w1, w3 and the columns of w2, which
            leaves the model's function unchanged, so that the wrappers read and
            write one contiguous slice instead of scattered rows and columns.
            Selections, logs and every saved model stay in the base order.
            Ignored (the base order is kept) with ``quantize_base``.
    """

    ratio: float = 0.1875
    ratio_heads: Optional[float] = None
    ratio_channels: Optional[float] = None
    tuned_ratio_heads: Optional[float] = None
    tuned_ratio_channels: Optional[float] = None
    delta: bool = False
    train_embeddings: bool = False
    quantize_base: bool = False
    contiguous_channels: bool = True

    def __post_init__(self) -> None:
        for name in ("ratio", "ratio_heads", "ratio_channels"):
            value = getattr(self, name)
            if name != "ratio" and value is None:
                continue
            if not _is_number(value) or not 0 <= value <= 0.5:
                raise ValueError(
                    f"apex.{name}={value!r} is out of range: it must be in [0, 0.5] "
                    "(P and N each take this fraction of units and must not overlap; "
                    "0 switches expansion off); the paper uses 0.1875"
                )
        if not self.kinds:
            raise ValueError(
                f"apex.ratio={self.ratio!r} with ratio_heads={self.ratio_heads!r} and "
                f"ratio_channels={self.ratio_channels!r} expands nothing; give heads or "
                "channels a ratio above 0 (the paper uses 0.1875)"
            )
        for kind in UNIT_KINDS:
            name, value = f"tuned_ratio_{kind}", getattr(self, f"tuned_ratio_{kind}")
            if value is None:
                continue
            if kind not in self.kinds:
                raise ValueError(
                    f"apex.{name}={value!r} but {kind} expansion is off ({self._ratio_field(kind)}=0); "
                    f"set apex.{name} to null"
                )
            low = 2 * self.unit_ratio(kind)
            if not _is_number(value) or not low <= value <= 1:
                raise ValueError(
                    f"apex.{name}={value!r} is out of range: it must be in "
                    f"[2 * {self._ratio_field(kind)}, 1] = [{low:g}, 1], since N and P are "
                    "always tuned; set it to null to tune only N and P"
                )

        if not isinstance(self.quantize_base, bool):
            raise ValueError(f"apex.quantize_base={self.quantize_base!r} must be true or false")
        if not isinstance(self.contiguous_channels, bool):
            raise ValueError(f"apex.contiguous_channels={self.contiguous_channels!r} must be true or false")

    def to_dict(self) -> dict:
        return asdict(self)

    def unit_ratio(self, kind: str) -> float:
        """The ratio K is computed from for ``kind`` ('heads' or 'channels')."""
        specific = self.ratio_heads if kind == "heads" else self.ratio_channels
        return self.ratio if specific is None else specific

    @property
    def kinds(self) -> Tuple[str, ...]:
        """The unit kinds APEX expands (those with a ratio above 0)."""
        return tuple(kind for kind in UNIT_KINDS if self.unit_ratio(kind) > 0)

    def _ratio_field(self, kind: str) -> str:
        """The config field that sets ``kind``'s ratio, for messages."""
        specific = f"ratio_{kind}"
        return f"apex.{specific}" if getattr(self, specific) is not None else f"apex.ratio (or apex.{specific})"

    def expanded_units(self, num_units: int, kind: str) -> int:
        """K for a layer with ``num_units`` units of ``kind``; 0 where ``kind`` is off."""
        ratio = self.unit_ratio(kind)
        if ratio == 0:
            return 0
        k = _round_half_up(ratio * num_units)
        if k < 1:
            # round(ratio * units) >= 1 needs ratio * units >= 0.5.
            raise ValueError(
                f"{self._ratio_field(kind)}={ratio} selects no {kind} out of {num_units}; "
                f"raise it to at least {_ceil_significant(0.5 / num_units):g}, or set "
                f"apex.ratio_{kind}=0 to switch {kind} expansion off"
            )
        if 2 * k > num_units:
            raise ValueError(
                f"{self._ratio_field(kind)}={ratio} needs 2 * {k} {kind} for P and N but the "
                f"layer has {num_units}; lower it"
            )
        return k

    def extra_units(self, num_units: int, kind: str) -> int:
        """|E|: tuned units beyond N and P (0 without the delta or with ``kind`` off)."""
        tuned_ratio = self.tuned_ratio_heads if kind == "heads" else self.tuned_ratio_channels
        if not self.delta or tuned_ratio is None or kind not in self.kinds:
            return 0
        tuned = _round_half_up(tuned_ratio * num_units)
        return max(tuned - 2 * self.expanded_units(num_units, kind), 0)


SELECTION_METHODS = ("activation", "random")


@dataclass(frozen=True)
class ApexSchedule:
    """When APEX assesses, re-selects and fuses during a run.

    Args:
        num_stages (int): T, the number of stages; boundaries split the run's
            optimizer steps evenly (with ``epochs == num_stages``, one stage per
            epoch, as in the reference). Ignored when ``steps_per_stage`` is set.
        steps_per_stage (Optional[int]): a boundary every this many optimizer steps.
        assess_samples (int): training examples scored before stage 1 (no grad).
        selection (str): "activation" (the method) or "random" (ablation).
    """

    num_stages: int = 2
    steps_per_stage: Optional[int] = None
    assess_samples: int = 12288
    selection: str = "activation"

    def __post_init__(self) -> None:
        if not isinstance(self.num_stages, int) or self.num_stages < 1:
            raise ValueError(f"apex.num_stages={self.num_stages!r} must be a positive integer")
        if self.steps_per_stage is not None and (
            not isinstance(self.steps_per_stage, int) or self.steps_per_stage < 1
        ):
            raise ValueError(
                f"apex.steps_per_stage={self.steps_per_stage!r} must be a positive integer or null"
            )
        if not isinstance(self.assess_samples, int) or self.assess_samples < 1:
            raise ValueError(f"apex.assess_samples={self.assess_samples!r} must be a positive integer")
        if self.selection not in SELECTION_METHODS:
            raise ValueError(f"apex.selection={self.selection!r} must be one of {SELECTION_METHODS}")

    def stage_ends(self, total_steps: int) -> List[int]:
        """The optimizer steps after which each stage ends (the last is ``total_steps``)."""
        if self.steps_per_stage is not None:
            ends = list(range(self.steps_per_stage, total_steps, self.steps_per_stage))
            return ends + [total_steps]
        if self.num_stages > total_steps:
            raise ValueError(
                f"apex.num_stages={self.num_stages} is more than the run's {total_steps} optimizer "
                "steps; lower apex.num_stages or train longer (epochs, max_steps_per_epoch)"
            )
        return [round(total_steps * (i + 1) / self.num_stages) for i in range(self.num_stages)]


def parse_apex_config(cfg: Optional[Mapping[str, Any]]) -> Tuple[ApexSettings, ApexSchedule]:
    """Split and validate a config's ``apex`` section, rejecting unknown keys by name."""
    cfg = dict(cfg or {})
    model_keys, schedule_keys = set(ApexSettings.__dataclass_fields__), set(ApexSchedule.__dataclass_fields__)
    unknown = sorted(set(cfg) - model_keys - schedule_keys)
    if unknown:
        raise ValueError(
            f"unknown apex config keys {unknown}; valid keys are {sorted(model_keys | schedule_keys)}"
        )
    settings = ApexSettings(**{k: v for k, v in cfg.items() if k in model_keys})
    schedule = ApexSchedule(**{k: v for k, v in cfg.items() if k in schedule_keys})
    return settings, schedule
