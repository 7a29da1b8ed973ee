"""The ``apex`` settings of a run, validated once, with the unit counts they imply."""

import math
from dataclasses import asdict, dataclass
from typing import Any, List, Mapping, Optional, Tuple


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
        quantize_base (bool): keep the frozen base weights of every layer's
            attention and FFN projections in 4-bit NF4 (torchao), as torchtune's
            QLoRA builders do; embeddings, norms and the output head stay in the
            run dtype. Fusion is then deferred: a stage boundary freezes the
            stage's operators instead of re-quantizing folded weights, and the
            plain checkpoint is folded once, in fp32, from the dequantized base
            (see :mod:`apex_tune.quantization`). Each projection's element count
            must be a multiple of 64 * 256 (NF4 block and scaler block).
    """

    ratio: float = 0.1875
    tuned_ratio_heads: Optional[float] = None
    tuned_ratio_channels: Optional[float] = None
    delta: bool = False
    train_embeddings: bool = False
    quantize_base: bool = False

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

        if not isinstance(self.quantize_base, bool):
            raise ValueError(f"apex.quantize_base={self.quantize_base!r} must be true or false")

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
