"""Where APEX lives in a torchtune decoder: the layers it expands, their unit geometry,
the wrapped projections of each kind, and which parameters are APEX's.

Works on decoders whose layers hold a ``MultiHeadAttention`` (``attn``) and a
SwiGLU ``FeedForward`` (``mlp`` with w1, w2, w3): torchtune's Llama 2,
Llama 3/3.1/3.2 and Qwen2/2.5 builders. Under GQA a head unit is a KV group:
one V head and the ``num_heads // num_kv_heads`` output_proj column slices
that read it.
"""

from dataclasses import dataclass
from typing import Iterator, List, Optional, Tuple

from torch import nn
from torchtune.modules import FeedForward, MultiHeadAttention

from apex_tune.modules.config import UNIT_KINDS
from apex_tune.modules.expansion import ApexExpansion, _ApexLinear

# The two kinds of units (the config's), in the order every per-kind loop visits them.
KINDS = UNIT_KINDS
HEADS, CHANNELS = KINDS
# Per kind: the attribute holding the projections, and their names.
PROJECTIONS = {HEADS: ("attn", ("q_proj", "k_proj", "v_proj", "output_proj")), CHANNELS: ("mlp", ("w1", "w3", "w2"))}
EMBEDDING_PARAMS = ("tok_embeddings.weight", "output.weight")
HISTORY = ".apex_history."


@dataclass
class ApexLayer:
    """The attention and FFN of one decoder layer, with their unit geometry."""

    index: int
    attn: MultiHeadAttention
    mlp: FeedForward

    @property
    def num_head_units(self) -> int:
        return self.attn.num_kv_heads

    @property
    def heads_per_unit(self) -> int:
        return self.attn.num_heads // self.attn.num_kv_heads

    @property
    def num_channel_units(self) -> int:
        return self.mlp.w1.out_features

    def num_units(self, kind: str) -> int:
        return self.num_head_units if kind == HEADS else self.num_channel_units

    def owner(self, kind: str) -> nn.Module:
        """The module holding the kind's projections, expansion and frozen stages."""
        return self.attn if kind == HEADS else self.mlp

    def expansion(self, kind: str) -> Optional[ApexExpansion]:
        """The kind's shared expansion; None where it is not expanded (or not wrapped)."""
        return getattr(self.owner(kind), "apex_expansion", None)

    @property
    def expanded_kinds(self) -> List[str]:
        return [kind for kind in KINDS if self.expansion(kind) is not None]

    def history(self, kind: str) -> Optional[nn.Module]:
        """The frozen earlier stages of a quantized base (None without ``quantize_base``)."""
        return getattr(self.owner(kind), "apex_history", None)

    def named_wrappers(self, kind: str) -> Iterator[Tuple[str, _ApexLinear]]:
        """(projection name, wrapper) of the kind's wrapped projections."""
        owner = self.owner(kind)
        for name in PROJECTIONS[kind][1]:
            module = getattr(owner, name)
            if isinstance(module, _ApexLinear):
                yield name, module

    def wrappers(self, kind: str) -> List[_ApexLinear]:
        return [module for _, module in self.named_wrappers(kind)]


def find_apex_layers(model: nn.Module) -> List[ApexLayer]:
    """The decoder layers APEX can expand; a clear error if there are none or one is malformed."""
    layers = getattr(model, "layers", None)
    found = []
    for i, layer in enumerate(layers or []):
        attn, mlp = getattr(layer, "attn", None), getattr(layer, "mlp", None)
        if not isinstance(attn, MultiHeadAttention) or not isinstance(mlp, FeedForward):
            continue
        if mlp.w3 is None:
            raise ValueError(f"layer {i}: APEX needs a gated (SwiGLU) FeedForward with w3")
        if attn.num_heads % attn.num_kv_heads != 0:
            raise ValueError(
                f"layer {i}: num_heads={attn.num_heads} is not a multiple of "
                f"num_kv_heads={attn.num_kv_heads}"
            )
        for name, features in (
            ("v_proj", attn.v_proj.out_features),
            ("k_proj", attn.k_proj.out_features),
        ):
            if features != attn.num_kv_heads * attn.head_dim:
                raise ValueError(
                    f"layer {i}: attn.{name} has {features} outputs, expected "
                    f"num_kv_heads * head_dim = {attn.num_kv_heads} * {attn.head_dim}"
                )
        if attn.output_proj.in_features != attn.num_heads * attn.head_dim:
            raise ValueError(
                f"layer {i}: attn.output_proj has {attn.output_proj.in_features} inputs, "
                f"expected num_heads * head_dim = {attn.num_heads} * {attn.head_dim}"
            )
        found.append(ApexLayer(i, attn, mlp))
    if not found:
        raise ValueError(
            f"{type(model).__name__} has no layers APEX supports: it needs "
            "model.layers[i].attn (torchtune MultiHeadAttention) and "
            "model.layers[i].mlp (torchtune FeedForward with w1, w2, w3), as built by "
            "torchtune's Llama 2, Llama 3.x and Qwen2.5 builders"
        )
    return found


def wrapped_layers(model: nn.Module) -> List[ApexLayer]:
    layers = [layer for layer in find_apex_layers(model) if layer.expanded_kinds]
    if not layers:
        raise ValueError("the model is not wrapped with APEX: call apply_apex first")
    return layers


# The APEX parameters by where they live: ``a`` and the Monarch factors in an
# ApexExpansion (``apex_expansion``), ``b`` in the column wrappers that mix (v_proj, w1,
# w3), ``delta`` in any wrapper. A parameter that merely has one of these leaf names
# elsewhere (``a`` of some other module) is not APEX's.
_APEX_SUFFIXES = {
    "apex_expansion.monarch.L1": "operators",
    "apex_expansion.monarch.L2": "operators",
    "apex_expansion.a": "vectors",
    **{f"{name}.b": "vectors" for name in ("v_proj", "w1", "w3")},
    **{f"{name}.delta": "deltas" for _, names in PROJECTIONS.values() for name in names},
}


def param_kind(name: str) -> str:
    """Report bucket of a parameter (or state-dict) name: operators (Monarch L1, L2),
    vectors (a, b), deltas, embeddings, history (frozen stages over a quantized base)
    or base (anything else)."""
    if HISTORY in f".{name}":
        return "history"
    parts = name.split(".")
    for length in (3, 2):
        kind = _APEX_SUFFIXES.get(".".join(parts[-length:]))
        if kind is not None:
            return kind
    if name in EMBEDDING_PARAMS:
        return "embeddings"
    return "base"
