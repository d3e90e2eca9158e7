"""Where each tensor of a served model comes from: resident, language expert, or a blend.

With bottom=b, top=u, transition=t on L layers: [0, b) language, [b, b+t) blend,
[b+t, L-u-t) resident, [L-u-t, L-u) blend, [L-u, L) language. A side with no
swapped layers (b=0 or u=0) gets no transition either: there is nothing to ease into.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

from modserve.checkpoint import layer_index
from modserve.errors import PlanError

SourceKind = Literal["resident", "language", "blend"]


@dataclass(frozen=True)
class Source:
    """`weight` of the language expert in the result: 0 resident, 1 language, else a blend."""

    kind: SourceKind
    weight: float

    @classmethod
    def of(cls, weight: float) -> Source:
        if weight == 0.0:
            return cls("resident", 0.0)
        if weight == 1.0:
            return cls("language", 1.0)
        return cls("blend", weight)


FROM_RESIDENT = Source("resident", 0.0)
FROM_LANGUAGE = Source("language", 1.0)


@dataclass(frozen=True)
class Plan:
    """The paper's layer swap for one language (defaults: Llama 3.1 8B on MGSM)."""

    bottom: int = 5
    top: int = 2
    transition: int = 1
    transition_weight: float = 0.5
    non_layer: str | float = "resident"

    def __post_init__(self) -> None:
        for field in ("bottom", "top", "transition"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise PlanError(f"{field}: must be a non-negative integer, got {value!r}")
        if not 0.0 <= float(self.transition_weight) <= 1.0:
            raise PlanError(f"transition_weight: must be in [0, 1], got {self.transition_weight!r}")
        non_layer = self.non_layer
        if isinstance(non_layer, str) and non_layer not in ("resident", "language"):
            try:
                non_layer = float(non_layer)
            except ValueError:
                raise PlanError(
                    f"non_layer: must be 'resident', 'language' or a blend weight, got {non_layer!r}"
                ) from None
        if not isinstance(non_layer, str) and not 0.0 <= float(non_layer) <= 1.0:
            raise PlanError(f"non_layer: blend weight must be in [0, 1], got {non_layer!r}")
        object.__setattr__(self, "non_layer", non_layer)
        object.__setattr__(self, "transition_weight", float(self.transition_weight))

    def transitions(self) -> tuple[int, int]:
        """Transition layers at the bottom and top boundary."""
        return (self.transition if self.bottom else 0, self.transition if self.top else 0)

    def check(self, num_layers: int) -> None:
        low, high = self.transitions()
        used = self.bottom + low + high + self.top
        if used > num_layers:
            raise PlanError(
                f"bottom ({self.bottom}) + top ({self.top}) + transition layers ({low + high}) "
                f"= {used} exceeds the model's {num_layers} layers"
            )

    def layer_source(self, layer: int, num_layers: int) -> Source:
        self.check(num_layers)
        low, high = self.transitions()
        if layer < self.bottom or layer >= num_layers - self.top:
            return FROM_LANGUAGE
        if layer < self.bottom + low or layer >= num_layers - self.top - high:
            return Source.of(self.transition_weight)
        return FROM_RESIDENT

    def non_layer_source(self) -> Source:
        if self.non_layer == "resident":
            return FROM_RESIDENT
        if self.non_layer == "language":
            return FROM_LANGUAGE
        return Source.of(float(self.non_layer))

    def tensor_source(self, name: str, num_layers: int) -> Source:
        layer = layer_index(name)
        if layer is None:
            return self.non_layer_source()
        return self.layer_source(layer, num_layers)

    def swapped_layers(self, num_layers: int) -> list[int]:
        return [i for i in range(num_layers) if self.layer_source(i, num_layers) != FROM_RESIDENT]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Plan:
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise PlanError(f"unknown plan field(s): {', '.join(sorted(unknown))}")
        return cls(**data)
