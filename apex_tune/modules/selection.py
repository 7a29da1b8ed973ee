"""P / N / E unit sets per layer, chosen from relative Top-K / Min-K scores."""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from apex_tune.modules.config import ApexSettings


@dataclass
class UnitSelection:
    """One layer's units of one kind: P (advantageous), N (disadvantageous), E (extra tuned)."""

    advantageous: torch.Tensor
    disadvantageous: torch.Tensor
    extra: torch.Tensor

    def ordered(self) -> torch.Tensor:
        """Unit ids in the order the wrappers lay them out: [N, P, E]."""
        return torch.cat([self.disadvantageous, self.advantageous, self.extra])

    @classmethod
    def empty(cls) -> "UnitSelection":
        """No units: the selection of a kind whose expansion is off."""
        none = torch.zeros(0, dtype=torch.long)
        return cls(none, none.clone(), none.clone())

    @classmethod
    def from_ordered(cls, units: torch.Tensor, num_expanded: int) -> "UnitSelection":
        k = num_expanded
        return cls(advantageous=units[k : 2 * k], disadvantageous=units[:k], extra=units[2 * k :])

    def to_dict(self) -> Dict[str, List[int]]:
        return {
            "P": self.advantageous.tolist(),
            "N": self.disadvantageous.tolist(),
            "E": self.extra.tolist(),
        }

    @classmethod
    def from_dict(cls, d: Dict[str, List[int]]) -> "UnitSelection":
        # On the CPU also under a `torch.device("meta")` context (models built on meta).
        as_tensor = lambda ids: torch.tensor(ids, dtype=torch.long, device="cpu")  # noqa: E731
        return cls(as_tensor(d["P"]), as_tensor(d["N"]), as_tensor(d["E"]))


@dataclass
class LayerSelection:
    heads: UnitSelection
    channels: UnitSelection

    def to_dict(self) -> dict:
        return {"heads": self.heads.to_dict(), "channels": self.channels.to_dict()}

    @classmethod
    def from_dict(cls, d: dict) -> "LayerSelection":
        return cls(UnitSelection.from_dict(d["heads"]), UnitSelection.from_dict(d["channels"]))


def select_units(
    relative_score: torch.Tensor,
    num_expanded: int,
    num_extra: int,
    tiebreak: Optional[torch.Tensor] = None,
) -> UnitSelection:
    """P = the K highest scores, N = the K lowest, E = the next-lowest ``num_extra``.

    Ties in the integer relative score are broken by ``tiebreak`` (the summed
    activation norms), then by unit id, so every rank picks the same sets.
    """
    n = relative_score.numel()
    if 2 * num_expanded + num_extra > n:
        raise ValueError(
            f"cannot select 2 * {num_expanded} + {num_extra} units out of {n}"
        )
    key = relative_score.double().cpu()
    if tiebreak is not None:
        # Relative scores are integers; a fraction in [0, 1) orders within them.
        tb = tiebreak.double().cpu()
        span = tb.max() - tb.min()
        key = key + (0.5 * (tb - tb.min()) / span if span > 0 else 0.0)
    order = torch.sort(key, stable=True).indices  # ascending, stable: low id first on ties
    disadvantageous = order[:num_expanded]
    extra = order[num_expanded : num_expanded + num_extra]
    advantageous = order[n - num_expanded :].flip(0)
    return UnitSelection(
        advantageous=advantageous.sort().values,
        disadvantageous=disadvantageous.sort().values,
        extra=extra.sort().values,
    )


# The selection file: written by `apex-tune assess`, read by the builder.
SELECTION_FILE_FORMAT = 1


def write_selection_file(
    path: Path, selection: List[LayerSelection], settings: ApexSettings, scores: Dict[str, Any], num_samples: int
) -> None:
    """The selection (and the settings that fix its sizes) as JSON for the builder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": SELECTION_FILE_FORMAT,
        "settings": settings.to_dict(),
        "assessed_samples": num_samples,
        "layers": [s.to_dict() for s in selection],
        "scores": scores,
    }
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload))
    tmp.replace(path)


def read_selection_file(path: Path, settings: ApexSettings) -> List[LayerSelection]:
    """The selection in ``path``; a one-line error if it is missing or was made for other settings."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(
            f"selection_file: {path} does not exist; write it with `apex-tune assess --config <this config>`"
        )
    try:
        payload = json.loads(path.read_text())
        layers = [LayerSelection.from_dict(d) for d in payload["layers"]]
        saved = payload["settings"]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"selection_file: {path} is not an apex-tune selection file ({e})") from e
    # Everything but what leaves the unit counts alone must match.
    current = {
        k: v for k, v in settings.to_dict().items()
        if k not in ("train_embeddings", "quantize_base", "contiguous_channels")
    }
    different = {k: (saved.get(k), v) for k, v in current.items() if saved.get(k) != v}
    if different:
        raise ValueError(
            f"selection_file: {path} was assessed with other settings (file vs config: {different}); "
            "run `apex-tune assess` again"
        )
    return layers
