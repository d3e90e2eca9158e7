"""`engine.pack_mode: grouped`: every language in one vLLM step, each row through its own pack's layers.

A swapped layer differs from the resident's only in its linears and norms; attention has
no weights. So in each layer a pack replaces, every linear and norm is wrapped
(`GroupedModule`): the step's rows are split by their request's language, a language's
rows run through a copy of the module that holds its pack's weights, the resident's rows
through the original. The copies are made by vLLM's own weight processing, so the same
kernels run (oneDNN on CPU). Attention, rotary embeddings, the KV cache and every layer no
pack touches run once over the whole batch: a mixed step reads the shared layers once,
the native backend's design, and no language ever waits for another's slice.

A row's language comes from its request id (`requests.submission_id`) and vLLM's
token-to-request map for the step (`StepLanguages`). Each wrapper runs as one opaque custom
op (`modserve::grouped`), so vLLM can compile the model around it: the graph holds the op and
a key, and the split is worked out afresh in every step. The wrappers are installed as the
model loads (`worker.GroupedPacksLoader`), before vLLM compiles it. One worker: the copies hold
unsharded weights.
"""

from __future__ import annotations

import copy
import itertools
import weakref
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from modserve.checkpoint import Checkpoint
from modserve.engine.vllm.lowrank import FEW_ROWS, EveryLanguageChange, LowRankChange, StackedDelta
from modserve.engine.vllm.requests import request_language
from modserve.errors import ModserveError
from modserve.packs.delta import stored_parts

# Modules whose input rows are the step's tokens (a per-head norm, like Qwen3's q_norm, is not).
TOKEN_ROW_MODULES = frozenset({
    "qkv_proj", "q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "gate_proj", "up_proj", "down_proj",
    "input_layernorm", "post_attention_layernorm",
})  # fmt: skip
RESIDENT_GROUP = 0


class UnsupportedPackError(ModserveError):
    """A pack whose tensors cannot run per language in a shared step."""


class StepLanguages:
    """Which rows of the running step belong to which language: worked out once per forward
    pass (vLLM sets a new forward context for each) from vLLM's token-to-request map. Until
    it is bound to the model runner (after start-up) every row is the resident's."""

    def __init__(self, languages: list[str]):
        self._runner = None
        self._index = {language: i + 1 for i, language in enumerate(languages)}
        self.size = len(languages) + 1  # groups: the resident's and one per language
        self._context = None
        self._groups: list[tuple[int, torch.Tensor | None]] = []
        self._rows: torch.Tensor | None = None

    def bind(self, runner) -> None:
        self._runner = runner

    def groups(self, rows: int) -> list[tuple[int, torch.Tensor | None]]:
        """[(group, row indices)]; a step of one language is [(group, None)]: all rows."""
        from vllm.forward_context import get_forward_context, is_forward_context_available

        context = get_forward_context() if is_forward_context_available() else None
        if context is None or context is not self._context:
            self._context = context
            self._groups, self._rows = self._split(rows)
        return self._groups

    def row_groups(self) -> torch.Tensor | None:
        """Each row's group in the step `groups` last split (None where it holds one group)."""
        return self._rows

    def _split(self, rows: int) -> tuple[list[tuple[int, torch.Tensor | None]], torch.Tensor | None]:
        runner = self._runner
        if runner is None:  # start-up's dummy runs and compilation
            return [(RESIDENT_GROUP, None)], None
        batch = runner.input_batch
        requests = batch.num_reqs
        scheduled = int(runner.query_start_loc.np[requests]) if requests else 0
        if not requests or scheduled > rows:  # a dummy run (start-up, profiling): nothing of ours
            return [(RESIDENT_GROUP, None)], None
        per_request = np.array([self._index.get(request_language(r), RESIDENT_GROUP) for r in batch.req_ids[:requests]])
        per_row = np.full(rows, RESIDENT_GROUP)  # rows past the scheduled tokens are padding
        per_row[:scheduled] = per_request[runner.req_indices.np[:scheduled]]
        present = np.unique(per_row)
        if len(present) == 1:
            return [(int(present[0]), None)], None
        device = runner.device
        groups = [(int(g), torch.from_numpy(np.flatnonzero(per_row == g)).to(device)) for g in present]
        return groups, torch.from_numpy(per_row).to(device)


def merge_rows(parts: list[tuple[torch.Tensor, object]], rows: int):
    """Each group's outputs (a tensor, or a tuple of tensors and Nones) back into batch order."""
    sample = parts[0][1]
    if isinstance(sample, tuple):
        return tuple(
            None if part is None else merge_rows([(idx, out[i]) for idx, out in parts], rows)
            for i, part in enumerate(sample)
        )
    merged = sample.new_empty((rows, *sample.shape[1:]))
    for idx, out in parts:
        merged.index_copy_(0, idx, out)  # faster than merged[idx] = out on CPU
    return merged


@dataclass
class ModuleChange:
    """What a pack changes in one vLLM module: parameters it replaces (run in a copy), or, for
    a delta pack's linear, Δ (added to the resident's output) with its bias change."""

    params: dict[str, torch.Tensor] = field(default_factory=dict)
    delta: StackedDelta | None = None


WRAPPERS: weakref.WeakValueDictionary[int, GroupedModule] = weakref.WeakValueDictionary()  # by op key
KEYS = itertools.count()


@torch.library.custom_op("modserve::grouped", mutates_args=())
def grouped(x: torch.Tensor, key: int) -> torch.Tensor:
    """A wrapped linear's output, or a norm's without a residual."""
    return WRAPPERS[key].run(x)


@grouped.register_fake
def _(x: torch.Tensor, key: int) -> torch.Tensor:
    return x.new_empty((x.shape[0], WRAPPERS[key].out_features or x.shape[1]))


@torch.library.custom_op("modserve::grouped_residual", mutates_args=())
def grouped_residual(x: torch.Tensor, residual: torch.Tensor, key: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A wrapped norm with the residual added first: (normed, new residual)."""
    return WRAPPERS[key].run(x, residual)


@grouped_residual.register_fake
def _(x: torch.Tensor, residual: torch.Tensor, key: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty_like(x), torch.empty_like(residual)


class GroupedModule(nn.Module):
    """A linear or norm of a swapped layer. A linear runs each language's rows through its own
    copy, or through the original plus its low-rank change; a norm (a pack changes only its
    weight) normalises every row at once and scales each by its own language's weight. The
    original and the copies are held, not registered, so the model's parameter names stay; the
    model calls them through one custom op, which a compiled graph keeps as a call."""

    def __init__(self, base: nn.Module, languages: StepLanguages):
        super().__init__()
        self._base = base
        self._copies: dict[int, nn.Module] = {}
        self._deltas: dict[int, LowRankChange] = {}
        self._every: EveryLanguageChange | None = None  # every group's delta at once
        self._pending: dict[int, StackedDelta] = {}
        self._languages = languages
        self.out_features = getattr(base, "output_size_per_partition", None)  # None: a norm
        self._returns_bias = self.out_features is not None and getattr(base, "return_bias", True)
        self._gains: torch.Tensor | None = None  # a norm's weight per group: the resident's where unchanged
        self._ones: torch.Tensor | None = None  # a norm's weight for a step of several groups
        self._key = next(KEYS)
        WRAPPERS[self._key] = self

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if residual is not None:
            return torch.ops.modserve.grouped_residual(x, residual, self._key)
        out = torch.ops.modserve.grouped(x, self._key)
        return (out, None) if self._returns_bias else out  # vLLM's linears: (output, bias to add)

    def add(self, group: int, change: ModuleChange, device, dtype) -> int:
        """Returns the bytes this group's change holds: its copy's parameters (a norm's weight),
        or its factors and bias change twice (alone, and stacked with every language's: see `finish`)."""
        held = sum(t.numel() for t in change.params.values()) * dtype.itemsize
        if self.out_features is None:
            if self._gains is None:
                resident = self._base.weight.detach()
                self._gains, self._ones = resident.expand(self._languages.size, -1).clone(), torch.ones_like(resident)
            self._gains[group] = change.params["weight"].to(device=device, dtype=dtype)
        elif change.params:
            self._copies[group] = module_copy(self._base, change.params, device, dtype)
        if change.delta is not None:
            delta = change.delta.to(device, dtype)
            self._deltas[group] = LowRankChange(self._base, delta)
            self._pending[group] = delta
            held += 2 * (delta.a.nbytes + sum(b.nbytes for b in delta.b) + (0 if delta.bias is None else delta.bias.nbytes))
        return held

    def finish(self) -> None:
        """After every group's `add`: stack the deltas for steps of few rows (their factors are
        held twice, since vLLM's weight processing packs each factor for its own kernel)."""
        if self._pending:
            self._every = EveryLanguageChange(self._base, self._pending, self._languages.size)
            self._pending = {}

    def run(self, x: torch.Tensor, *rest: torch.Tensor):
        """The op's work, in outputs that never alias its inputs."""
        groups = self._languages.groups(x.shape[0])
        if self.out_features is None:
            return self.norm(x, *rest, groups=groups)
        own = [(g, idx) for g, idx in groups if g in self._copies]
        if not own:
            out = self._base(x)
        elif len(groups) == 1:
            return unbiased(self._copies[groups[0][0]](x))
        else:
            shared = [idx for g, idx in groups if g not in self._copies]
            parts = [(idx, self._copies[g](x.index_select(0, idx))) for g, idx in own]
            if shared:
                idx = torch.cat(shared)
                parts.append((idx, self._base(x.index_select(0, idx))))
            out = merge_rows(parts, x.shape[0])
        changed = [(g, idx) for g, idx in groups if g in self._deltas]
        if changed:
            y = out[0] if isinstance(out, tuple) else out  # a linear's (output, bias) or output
            if len(changed) > 1 and x.shape[0] <= FEW_ROWS:
                self._every.add_to(y, x, self._languages.row_groups())
            else:
                for g, idx in changed:
                    self._deltas[g].add_to(y, x, idx)
        return unbiased(out)

    def norm(self, x: torch.Tensor, residual: torch.Tensor | None = None, *, groups):
        """vLLM's own RMSNorm kernel (its eager Python norm is 7-25x slower), with the step's one
        weight; over several languages, with a weight of ones and then each row scaled by its
        group's weight — what each language's norm computes (x̂ · 1 is x̂)."""
        mixed = len(groups) > 1
        weight = self._ones if mixed else self._gains[groups[0][0]]
        out = rms_norm(x, residual, weight, self._base.variance_epsilon)
        if mixed:
            normed = out[0] if isinstance(out, tuple) else out
            normed.mul_(self._gains.index_select(0, self._languages.row_groups()))
        return out


def rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, epsilon: float):
    """RMSNorm of x (of x + residual, returned with that sum as the new residual, where one is
    given) through vLLM's C++/CUDA kernels, which write in place: into copies, as an op's
    outputs never alias its inputs."""
    from vllm import _custom_ops as ops

    if residual is None:
        out = torch.empty_like(x)
        ops.rms_norm(out, x, weight, epsilon)
        return out
    x, residual = x.clone(), residual.clone()
    ops.fused_add_rms_norm(x, residual, weight, epsilon)
    return x, residual


def unbiased(out):
    """A linear's output without the (output, None) pair vLLM's linears return."""
    return out[0] if isinstance(out, tuple) and out[1] is None else out


def module_changes(model: nn.Module, manifest, stored: dict[str, torch.Tensor], resident: Checkpoint) -> dict[str, ModuleChange]:
    """{vLLM module path: change} for a pack's HF-named tensors, stacked as vLLM stacks q/k/v
    and gate/up: whole tensors concatenated, factors as a `StackedDelta`."""
    whole, factors = stored_parts(manifest, stored)
    changes: dict[str, ModuleChange] = defaultdict(ModuleChange)
    for path, _, names in by_module(model, factors):
        changes[path].delta = StackedDelta(
            a=torch.cat([factors[name][0].float() for name in names]), b=[factors[name][1].float() for name in names]
        )
    for path, param, names in by_module(model, whole):
        tensor = torch.cat([whole[name] for name in names])
        if param == "bias" and changes[path].delta is not None:
            changes[path].delta.bias = tensor.float() - torch.cat([resident.get(name) for name in names]).float()
        else:
            changes[path].params[param] = tensor
    return dict(changes)


def by_module(model: nn.Module, tensors: dict) -> list[tuple[str, str, list[str]]]:
    """(vLLM module path, parameter, the HF tensor names stacked into it, in vLLM's order) for
    every module the named tensors belong to; a stacked module must get every shard (a pack
    holds whole layers)."""
    mapping = getattr(model, "packed_modules_mapping", {})
    stacked = {shard: packed for packed, shards in mapping.items() for shard in shards}
    modules: dict[tuple[str, str], list[str]] = {}
    for name in tensors:
        path, _, param = name.rpartition(".")
        prefix, _, leaf = path.rpartition(".")
        if leaf in stacked and not has_module(model, path):
            packed = stacked[leaf]
            modules[(f"{prefix}.{packed}", param)] = [f"{prefix}.{shard}.{param}" for shard in mapping[packed]]
        else:
            modules[(path, param)] = [name]
    for stack in modules.values():
        missing = [name for name in stack if name not in tensors]
        if missing:
            present = ", ".join(name for name in stack if name not in missing)
            raise UnsupportedPackError(f"{', '.join(missing)}: missing, and vLLM stacks it with {present}")
    return [(path, param, stack) for (path, param), stack in modules.items()]


def has_module(model: nn.Module, path: str) -> bool:
    try:
        model.get_submodule(path)
    except AttributeError:
        return False
    return True


def checked_module(model: nn.Module, path: str, change: ModuleChange) -> nn.Module:
    """The vLLM module a change is for, if its rows are tokens and the change fits it."""
    from vllm.model_executor.layers.layernorm import RMSNorm
    from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod

    names = ", ".join(f"{path}.{p}" for p in sorted(change.params) + (["weight (factors)"] if change.delta else []))
    if path.rpartition(".")[2] not in TOKEN_ROW_MODULES or not has_module(model, path):
        raise UnsupportedPackError(f"{names}: not a linear or norm of a decoder layer")
    module = model.get_submodule(path)
    linear = isinstance(module, LinearBase) and isinstance(module.quant_method, UnquantizedLinearMethod)
    plain_norm = type(module) is RMSNorm and module.has_weight and module.variance_size_override is None
    if not (linear and not module.skip_bias_add) and not (plain_norm and change.delta is None and set(change.params) == {"weight"}):
        raise UnsupportedPackError(f"{names}: vLLM runs it as {type(module).__name__}, not a plain linear or RMSNorm")
    shapes = {param: tuple(tensor.shape) for param, tensor in change.params.items()}
    if change.delta is not None:
        shapes["weight"] = change.delta.shape
    if change.delta is not None and change.delta.bias is not None:
        shapes["bias"] = tuple(change.delta.bias.shape)
    for param, shape in shapes.items():
        expected = None
        if linear and param == "weight":
            expected = (module.output_size_per_partition, module.input_size_per_partition)
        elif isinstance(getattr(module, param, None), torch.Tensor):
            expected = tuple(getattr(module, param).shape)
        if shape != expected:
            raise UnsupportedPackError(f"{path}.{param}: shape {list(shape)}, the model's is {expected}")
    return module


def module_copy(base: nn.Module, params: dict[str, torch.Tensor], device, dtype) -> nn.Module:
    """The module with a pack's weights, processed as vLLM processes loaded weights."""
    clone = copy.deepcopy(base)
    for name, tensor in params.items():
        setattr(clone, name, nn.Parameter(tensor.to(device=device, dtype=dtype).contiguous(), requires_grad=False))
    quant_method = getattr(clone, "quant_method", None)
    if quant_method is not None:
        quant_method.process_weights_after_loading(clone)
    return clone


def group_packs(
    model: nn.Module, packs: dict[str, tuple], resident: Checkpoint, dtype, device
) -> tuple[StepLanguages, dict[str, int]]:
    """Wrap every module any pack changes and give it each pack's change; `packs` holds each
    language's verified (manifest, stored tensors). Returns the step's languages and the bytes
    each language's changes hold. Every pack is checked before the model is touched, so a pack
    that cannot run leaves it as it was."""
    plans = {}
    for language, (manifest, stored) in packs.items():
        try:
            changes = module_changes(model, manifest, stored, resident)
            plans[language] = [(path, checked_module(model, path, change), change) for path, change in changes.items()]
        except UnsupportedPackError as err:
            raise UnsupportedPackError(f"packs.{language}: pack_mode grouped cannot run {err}") from None
    languages = StepLanguages(sorted(packs))
    wrappers: dict[str, GroupedModule] = {}
    held = dict.fromkeys(packs, 0)
    for group, language in enumerate(sorted(packs), start=1):
        for path, base, change in plans[language]:
            if path not in wrappers:
                wrappers[path] = GroupedModule(base, languages)
                parent, _, leaf = path.rpartition(".")
                setattr(model.get_submodule(parent), leaf, wrappers[path])
            held[language] += wrappers[path].add(group, change, device, dtype)
    for wrapper in wrappers.values():
        wrapper.finish()
    return languages, held
