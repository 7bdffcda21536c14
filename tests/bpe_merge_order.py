#!/usr/bin/env python3
"""How closely real BPE vocabularies follow merge order (docs/folders.md).

Usage: bpe_merge_order.py [CACHE_DIR]   (default: $AIRLOCK_MODEL_CACHE or ~/.cache/airlock-models)

Reads llama.cpp's vocabulary-only GGUF files (models/ggml-vocab-*.gguf) from
the llama-cpp-python 0.3.36 source distribution, fetched from PyPI and
sha256-checked by fetch_models.py, and prints for each tokenizer with merges
how many times the id of the token a merge makes is smaller than the id made
by the merge before ("breaks"), then the same after exchanging two tokens' ids.
tokenizer_check reads 1 to 8 breaks as ids moved by hand.
"""
import os
import random
import struct
import sys
import tarfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fetch_models  # noqa: E402

# Sizes of GGUF's fixed-size value types, by type id.
SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def string_arrays(data):
    """The GGUF's key/values, with string arrays decoded and everything else None."""
    at = 8  # magic and version

    def take(fmt):
        nonlocal at
        (v,) = struct.unpack_from(fmt, data, at)
        at += struct.calcsize(fmt)
        return v

    def text():
        nonlocal at
        n = take("<Q")
        s = data[at:at + n].decode("utf-8", "replace")
        at += n
        return s

    def value(kind):
        nonlocal at
        if kind == 8:
            return text()
        if kind == 9:
            inner, n = take("<I"), take("<Q")
            if inner == 8:
                return [text() for _ in range(n)]
            at += SIZES[inner] * n
            return None
        at += SIZES[kind]
        return None

    take("<Q")  # tensor count
    kvs = {}
    for _ in range(take("<Q")):
        key = text()
        kvs[key] = value(take("<I"))
    return kvs


def breaks(tokens, merges, ids):
    made = [ids.get(m.replace(" ", "", 1)) for m in merges]
    made = [i for i in made if i is not None]
    return sum(1 for i in range(1, len(made)) if made[i] < made[i - 1])


def main():
    cache = sys.argv[1] if len(sys.argv) > 1 else os.environ.get(
        "AIRLOCK_MODEL_CACHE", os.path.expanduser("~/.cache/airlock-models"))
    sdist = fetch_models.fetch_llama_cpp_sdist(os.path.abspath(cache))
    rng = random.Random(0)
    with tarfile.open(sdist) as tar:
        for m in sorted(tar.getmembers(), key=lambda m: m.name):
            name = os.path.basename(m.name)
            if not (name.startswith("ggml-vocab-") and name.endswith(".gguf")):
                continue
            kvs = string_arrays(tar.extractfile(m).read())
            tokens, merges = kvs.get("tokenizer.ggml.tokens"), kvs.get("tokenizer.ggml.merges")
            if not tokens or not merges:
                continue
            ids = {t: i for i, t in enumerate(tokens)}
            real = breaks(tokens, merges, ids)
            made = [m.replace(" ", "", 1) for m in merges if m.replace(" ", "", 1) in ids]
            a, b = rng.sample(made[len(made) // 10:], 2)
            ids[a], ids[b] = ids[b], ids[a]
            print(f"{name:34} {kvs.get('tokenizer.ggml.model', '?'):8} merges {len(merges):7}  "
                  f"breaks {real:5}  after one swap {breaks(tokens, merges, ids)}")


if __name__ == "__main__":
    main()
