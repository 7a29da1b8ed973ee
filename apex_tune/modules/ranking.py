"""Activation ranking: the relative Top-K / Min-K scores that choose P and N.

Per micro-batch and layer:
- head unit score: the L2 norm, over the counted tokens, of the attention output
  of the unit's heads, read by a forward pre-hook on ``output_proj`` (its input is
  the concatenated head outputs, so attention itself is untouched);
- channel score: the L2 norm of the gate activation ``act(w1 x)[:, c]``, read by
  a forward hook on the layer's activation module. torchtune's ``FeedForward``
  shares one activation module (a default argument: one module for every layer of
  every model in the process), so :meth:`ActivationRanker.attach` gives each layer
  its own copy first (stateless: the model computes the same; the
  copies stay after :meth:`~ActivationRanker.detach`).

With ``apex.contiguous_channels`` the activation's channels are in the FFN's physical
order (see :mod:`apex_tune.modules.layout`); their norms are put back in base channel
order before they are counted, so scores and selections are in base unit ids.

Each micro-batch adds +1 to the K highest units and -1 to the K lowest. Tokens
are counted where ``mask`` is true (pass the positions the loss trains on, so
padding and ignored positions are excluded).
"""

import copy
import weakref
from contextlib import contextmanager
from dataclasses import replace
from typing import Dict, List, Optional

import torch
import torch.distributed as dist
from torch import nn

from apex_tune.modules._dtensor import collective_device
from apex_tune.modules.layout import physical_to_base
from apex_tune.modules.model import CHANNELS, HEADS, ApexLayer, find_apex_layers
from apex_tune.modules.selection import LayerSelection, UnitSelection, select_units
from apex_tune.modules.config import ApexSettings


# Activation modules the rankers made per layer (see ActivationRanker._own_activation).
_OWN_ACTIVATIONS: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


class ActivationRanker:
    """Accumulates relative activation scores for every APEX layer of ``model``.

    Call :meth:`attach`, then :meth:`begin_microbatch` (with the token mask)
    before each forward. Hooks record once per layer per micro-batch, so
    activation checkpointing's recomputed forward is not counted twice. Detached,
    the model carries no hooks at all.
    """

    def __init__(self, model: nn.Module, settings: ApexSettings):
        self.settings = settings
        self.layers: List[ApexLayer] = find_apex_layers(model)
        self._handles = []
        self._mask: Optional[torch.Tensor] = None
        self._microbatch = 0
        self._recorded: Dict[tuple, int] = {}
        self._num_recording = 0  # hooks that record, per micro-batch
        self._unrecorded = 0  # of those, the ones that have not recorded yet in this micro-batch
        self._stop_forward = False  # see stop_after_last_hook
        # The decoder layer holding the last hooks: where a scoring-only forward can stop.
        self._last_layer: nn.Module = model.layers[self.layers[-1].index]
        self.relative: Dict[str, List[torch.Tensor]] = {}
        self.activation: Dict[str, List[torch.Tensor]] = {}
        self.num_microbatches = 0
        self.reset()

    # --- lifecycle -------------------------------------------------------
    def attach(self) -> "ActivationRanker":
        if self._handles:
            return self
        # Only the kinds APEX expands are scored (a kind with ratio 0 has no K).
        for pos, layer in enumerate(self.layers):
            if HEADS in self.settings.kinds:
                self._handles.append(
                    layer.attn.output_proj.register_forward_pre_hook(self._head_hook(pos, layer))
                )
            if CHANNELS in self.settings.kinds:
                activation = self._own_activation(layer)
                self._handles.append(activation.register_forward_hook(self._channel_hook(pos, layer)))
        self._num_recording = len(self._handles)
        self._handles.append(self._last_layer.register_forward_hook(self._stop_hook))
        return self

    def _own_activation(self, layer: ApexLayer) -> nn.Module:
        """The layer's own activation module: a copy the first time, as the module torchtune
        builds is shared by every FeedForward of every model in the process. Only a
        stateless module is copied: a copy of one with parameters or buffers would untie
        them from the model's."""
        activation = layer.mlp.activation
        if next(activation.parameters(), None) is not None or next(activation.buffers(), None) is not None:
            if sum(other.mlp.activation is activation for other in self.layers) > 1:
                raise ValueError(
                    f"the FFN activation {type(activation).__name__} has parameters and is shared by several "
                    "layers: channel ranking needs one per layer (build each FeedForward its own)"
                )
            return activation
        if activation not in _OWN_ACTIVATIONS:
            activation = copy.deepcopy(activation)
            _OWN_ACTIVATIONS.add(activation)
            layer.mlp.activation = activation
        return activation

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def reset(self) -> None:
        """Forget the accumulated scores (start of a stage)."""
        self.relative = {
            kind: [torch.zeros(layer.num_units(kind), dtype=torch.float64) for layer in self.layers]
            for kind in (HEADS, CHANNELS)
        }
        self.activation = {
            kind: [torch.zeros(layer.num_units(kind), dtype=torch.float64) for layer in self.layers]
            for kind in (HEADS, CHANNELS)
        }
        self.num_microbatches = 0
        self._recorded.clear()

    def begin_microbatch(self, mask: Optional[torch.Tensor] = None) -> None:
        """Start a micro-batch; ``mask`` (batch, seq) marks the tokens to count (None: all)."""
        self._mask = mask
        self._microbatch += 1
        self.num_microbatches += 1
        self._unrecorded = self._num_recording if self._handles else 0

    @contextmanager
    def stop_after_last_hook(self):
        """Within it, a forward that only scores skips what comes after the last hooked
        layer: that layer's output is cut to zero positions, so the final norm and the
        output head (and any later layer) run on an empty sequence and the model returns
        empty logits. The forward itself completes, so FSDP's and torch.compile's hooks
        around every module run as usual. For the assessment pass."""
        self._stop_forward = True
        try:
            yield
        finally:
            self._stop_forward = False

    # Not traced by torch.compile, like _record: it reads Python state that changes.
    @torch.compiler.disable
    def _stop_hook(self, module, args, output):
        if self._stop_forward and self._unrecorded == 0 and torch.is_tensor(output):
            return output[:, :0]  # (batch, seq, dim): no position left for the layers after
        return None

    # --- hooks -----------------------------------------------------------
    def _unit_norms(self, h: torch.Tensor, num_units: int) -> torch.Tensor:
        """L2 norm per unit of ``h`` (batch, seq, units * unit_width) over counted tokens, in fp32.

        The squares (in fp32: a bf16 activation converts exactly) are summed over the
        tokens by one matrix product with the mask (or ones) as a row: that applies the
        mask in the same pass, and is several times faster on CPU than a reduction over
        the leading dims (or ``torch.linalg.vector_norm``)."""
        flat = h.detach().reshape(-1, h.shape[-1])
        squares = flat.square() if flat.dtype == torch.float32 else flat.float().square_()
        if self._mask is None:
            weights = squares.new_ones(1, flat.shape[0])
        else:
            weights = self._mask.reshape(1, -1).to(device=h.device, dtype=torch.float32)
        sq = (weights @ squares).view(num_units, -1)
        return (sq.sum(-1) if sq.shape[-1] > 1 else sq.view(-1)).sqrt()

    # Not traced by torch.compile: the once-per-micro-batch check reads a Python int that
    # changes every micro-batch, and a guard on it would recompile the layer each step.
    # The norms it receives are still computed inside the compiled graph.
    @torch.compiler.disable
    def _record(self, kind: str, pos: int, norms: torch.Tensor) -> None:
        key = (kind, pos)
        if self._recorded.get(key) == self._microbatch:
            return  # recomputation under activation checkpointing
        self._recorded[key] = self._microbatch
        if kind == CHANNELS:
            norms = self._in_base_order(pos, norms)
        k = self.settings.expanded_units(norms.numel(), kind)
        norms = norms.double()
        # Stay on the activations' device: no host sync on the training hot path.
        if self.relative[kind][pos].device != norms.device:
            self.relative[kind][pos] = self.relative[kind][pos].to(norms.device)
            self.activation[kind][pos] = self.activation[kind][pos].to(norms.device)
        order = torch.argsort(norms, stable=True)
        step = torch.zeros_like(norms)
        step[order[-k:]] += 1
        step[order[:k]] -= 1
        self.relative[kind][pos] += step
        self.activation[kind][pos] += norms
        self._unrecorded -= 1

    def _in_base_order(self, pos: int, norms: torch.Tensor) -> torch.Tensor:
        """Per-channel values in the FFN's physical order, in base channel order (one
        gather on their device; no host sync)."""
        index = physical_to_base(self.layers[pos].expansion(CHANNELS))
        return norms if index is None else norms.index_select(0, index.to(norms.device))

    def _head_hook(self, pos: int, layer: ApexLayer):
        def hook(module, args):
            self._record(HEADS, pos, self._unit_norms(args[0], layer.num_head_units))

        return hook

    def _channel_hook(self, pos: int, layer: ApexLayer):
        def hook(module, args, output):
            self._record(CHANNELS, pos, self._unit_norms(output, layer.num_channel_units))

        return hook

    # --- results ---------------------------------------------------------
    def all_reduce(self) -> None:
        """Sum the scores over data-parallel ranks (no-op outside torch.distributed)."""
        if not (dist.is_available() and dist.is_initialized()):
            return
        backend_device = collective_device()
        for store in (self.relative, self.activation):
            for kind in (HEADS, CHANNELS):
                flat = torch.cat([t.to(backend_device) for t in store[kind]])
                dist.all_reduce(flat)
                store[kind] = list(flat.cpu().split([t.numel() for t in store[kind]]))
        count = torch.tensor([self.num_microbatches], device=backend_device)
        dist.all_reduce(count)
        self.num_microbatches = int(count.item())

    def state_dict(self) -> dict:
        """The scores summed over ranks (a collective: every rank must call it)."""
        relative = {k: [t.clone() for t in v] for k, v in self.relative.items()}
        activation = {k: [t.clone() for t in v] for k, v in self.activation.items()}
        count = self.num_microbatches
        self.all_reduce()
        state = {
            "relative": {k: [t.cpu() for t in v] for k, v in self.relative.items()},
            "activation": {k: [t.cpu() for t in v] for k, v in self.activation.items()},
            "num_microbatches": self.num_microbatches,
        }
        self.relative, self.activation, self.num_microbatches = relative, activation, count
        return state

    def load_state_dict(self, state: dict, keep: bool = True) -> None:
        """Restore summed scores. With ``keep=False`` (every rank but one) start
        from zero instead, so that a later all-reduce counts the sums once."""
        self.reset()
        if keep:
            self.relative = {k: [t.clone() for t in v] for k, v in state["relative"].items()}
            self.activation = {k: [t.clone() for t in v] for k, v in state["activation"].items()}
            self.num_microbatches = state["num_microbatches"]

    def select(self, **overrides) -> List[LayerSelection]:
        """P, N, E per layer from the accumulated scores; empty for a kind not expanded.

        Sizes come from the settings the ranker was built with, with ``overrides``
        (:class:`ApexSettings` fields, e.g. ``ratio=0.25``) replaced; they match
        what :func:`apex_tune.apply_apex` builds for the same settings.
        """
        if self.num_microbatches == 0:
            raise RuntimeError("no micro-batch was scored: run forward passes after attach()")
        settings: ApexSettings = replace(self.settings, **overrides)
        unscored = sorted(set(settings.kinds) - set(self.settings.kinds))
        if unscored:
            raise ValueError(f"{unscored} were not scored: the ranker's settings do not expand them")
        selections = []
        for pos, layer in enumerate(self.layers):
            per_kind = {kind: UnitSelection.empty() for kind in (HEADS, CHANNELS)}
            for kind in settings.kinds:
                n = layer.num_units(kind)
                per_kind[kind] = select_units(
                    self.relative[kind][pos].cpu(),
                    settings.expanded_units(n, kind),
                    settings.extra_units(n, kind),
                    tiebreak=self.activation[kind][pos].cpu(),
                )
            selections.append(LayerSelection(**per_kind))
        return selections

    def scores(self) -> dict:
        """Per-layer relative scores and mean activation norms, for logs."""
        count = max(self.num_microbatches, 1)
        return {
            kind: [
                {"relative": r.cpu().tolist(), "mean_norm": (a.cpu() / count).tolist()}
                for r, a in zip(self.relative[kind], self.activation[kind])
            ]
            for kind in (HEADS, CHANNELS)
        }
