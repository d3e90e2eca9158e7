"""How closely a delta pack follows its exact pack, measured, never assumed.

Teacher-forced on a prompt set (by default the language's MGSM questions): at every
position of every prompt, the KL divergence of the delta pack's next-token distribution
from the exact pack's, and whether both put the same token on top. Both run through
transformers on the resident with the pack's tensors loaded: the same path as the
merged checkpoint every engine is tested against.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from modserve.checkpoint import Checkpoint
from modserve.errors import ModserveError

PROMPTS_PER_LANGUAGE = 32
MAX_PROMPT_TOKENS = 256
# The repository's copy of MGSM, when modserve runs from a clone (it is not in the package).
REPOSITORY_MGSM = Path(__file__).resolve().parents[2] / "data" / "mgsm"


def read_prompts(path: Path, language: str) -> list[str]:
    """Prompts from a text file (one per line; a .tsv's first column) or from a directory
    holding MGSM's `mgsm_<lang>.tsv`."""
    file = Path(path) / f"mgsm_{language}.tsv" if Path(path).is_dir() else Path(path)
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise ModserveError(f"--fidelity-prompts: cannot read {file} ({err.strerror})") from None
    prompts = [line.split("\t")[0] if file.suffix == ".tsv" else line for line in lines]
    prompts = [p for p in prompts if p.strip()][:PROMPTS_PER_LANGUAGE]
    if not prompts:
        raise ModserveError(f"--fidelity-prompts: {file} holds no prompts")
    return prompts


def default_prompts(language: str) -> list[str]:
    """The language's MGSM questions from the repository's copy; a clear error without it."""
    if not (REPOSITORY_MGSM / f"mgsm_{language}.tsv").is_file():
        raise ModserveError(
            f"--fidelity-prompts: no MGSM questions for {language!r} in {REPOSITORY_MGSM}; give a "
            "text file (one prompt per line), or --no-fidelity to skip the measurement"
        )
    return read_prompts(REPOSITORY_MGSM, language)


class FidelityProbe:
    """The resident in transformers, once per build, with pack tensors swapped in per measurement."""

    def __init__(self, resident: Checkpoint):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.resident = resident
        self.model = AutoModelForCausalLM.from_pretrained(resident.path, dtype=torch.float32, use_safetensors=True)
        self.model.eval()
        self.tokenizer = AutoTokenizer.from_pretrained(resident.path)
        self.params = dict(self.model.named_parameters())

    def _load(self, tensors: Mapping[str, Tensor]) -> None:
        with torch.no_grad():
            for name, tensor in tensors.items():
                self.params[name].copy_(tensor)

    def _restore(self, names: list[str]) -> None:
        self._load({name: self.resident.get(name) for name in names})

    @torch.no_grad()
    def _logprobs(self, tensors: Mapping[str, Tensor], batches: list[Tensor]) -> list[Tensor]:
        self._load(tensors)
        try:
            return [F.log_softmax(self.model(ids[None]).logits[0].float(), -1) for ids in batches]
        finally:
            self._restore(list(tensors))

    def measure(self, exact: Mapping[str, Tensor], approx: Mapping[str, Tensor], prompts: list[str]) -> dict:
        ids = [self.tokenizer(p, return_tensors="pt").input_ids[0, :MAX_PROMPT_TOKENS] for p in prompts]
        ids = [t for t in ids if t.numel() > 0]
        reference = self._logprobs(exact, ids)
        candidate = self._logprobs(approx, ids)
        kl = torch.cat([(r.exp() * (r - c)).sum(-1) for r, c in zip(reference, candidate, strict=True)])
        agree = torch.cat([r.argmax(-1) == c.argmax(-1) for r, c in zip(reference, candidate, strict=True)])
        return {
            "measured": True,
            "prompts": len(ids),
            "tokens": int(agree.numel()),
            "kl_mean": float(kl.mean()),
            "kl_max": float(kl.max()),
            "top1_agreement": float(agree.float().mean()),
        }
