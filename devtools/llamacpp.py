"""A real llama.cpp engine built here, with no registry: the image and a tiny GGUF model.

tests/test_real_engine.py runs them through the whole path (agent, probe, scheduler). Three
artefacts, each built once and cached under ``~/.cache/aivmm`` (``AIVMM_CACHE`` overrides):

1. **The llama-cpp-python wheel** (``wheels/``). PyPI has only its source (76 MB, llama.cpp
   inside), so ``pip wheel`` compiles llama.cpp with cmake once: a CPU build (no
   ``-march=native``, so the cache works on any x86-64 with AVX2; no OpenMP, no multimodal
   library, no tests or tools), ``CMAKE_BUILD_PARALLEL_LEVEL`` = the CPU count.
2. **Its site directory** (``llamacpp-site-<version>-<python>/``): the wheel with the server's
   pure-Python dependencies (uvicorn, FastAPI, sse-starlette, ...), ``pip install --target``.
3. **The image** ``aivmm-llamacpp:local``, FROM scratch by :mod:`devtools.image` like the sim's:
   this machine's interpreter and the libraries ``ldd`` names, the site directory, and
   ``aivmm_llama_server``, a small entry module (``SHIM``) that takes llama.cpp's own
   ``llama-server`` flags (``-m``, ``--alias``, ``--host``, ``--port``, ``--metrics``, ...),
   so the agent's ``llamacpp`` profile runs it unchanged, and serves the model with
   ``llama_cpp.server``. llama_cpp.server has no ``/health`` and no ``/metrics``: the shim adds
   both, ``/metrics`` with llama-server's names (``llamacpp:requests_processing``,
   ``llamacpp:requests_deferred``) counted from the requests in flight (llama_cpp.server
   runs one at a time behind a lock; the others wait). It also turns off llama_cpp.server's
   ``interrupt_requests``, which ends a streamed answer early whenever another request waits
   for the model (the agent's probe of ``/v1/models`` does, every probe interval). Like
   llama-server it takes the clients' key from ``--api-key`` or ``LLAMA_ARG_API_KEY``.

And **the model** (``models/tiny-llama-<seed>.gguf``): a llama-architecture GGUF written with
the ``gguf`` package: 4 layers, width 128, a 512-token SentencePiece-style vocabulary (the
256 byte tokens, letters, common English words), random weights from a fixed seed, 4 MiB.
It loads in llama.cpp and generates (garbage, deterministically).

    python -m devtools.llamacpp [--docker-host URL] [--models-dir DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from devtools.image import ImageSpec, build_spec

LLAMA_CPP_PYTHON = "0.3.36"
# What llama_cpp.server imports, beyond llama_cpp_python's own requirements (its "server"
# extra, pinned here so the cached site directory is the same everywhere).
SERVER_REQUIREMENTS = ("uvicorn==0.54.0", "fastapi==0.165.0", "pydantic-settings==2.16.3",
                       "sse-starlette==3.7.0", "starlette-context==0.3.6", "PyYAML==6.0.4")
IMAGE = "aivmm-llamacpp"
MODEL_SEED = 1234
# CPU build: portable (GGML_NATIVE off keeps AVX2/FMA/F16C, not this CPU's every extension),
# no OpenMP runtime to carry, no multimodal (mtmd) library, no tests, examples or tools.
CMAKE_ARGS = ("-DGGML_NATIVE=OFF -DGGML_OPENMP=OFF -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF "
              "-DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF")


def cache_dir() -> Path:
    return Path(os.environ.get("AIVMM_CACHE") or Path.home() / ".cache" / "aivmm")


def _say(message: str, quiet: bool) -> None:
    if not quiet:
        print(f"llamacpp: {message}", flush=True)


def _run(cmd: list[str], *, env: dict[str, str] | None = None, what: str,
         quiet: bool) -> None:
    """Run ``cmd``; print a line every 30 s while it runs, and its output if it fails."""
    started = time.monotonic()
    done = threading.Event()

    def beat() -> None:
        while not done.wait(30):
            _say(f"  {what}: {time.monotonic() - started:.0f}s so far", quiet)

    ticker = threading.Thread(target=beat, daemon=True)
    ticker.start()
    try:
        result = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    finally:
        done.set()
    if result.returncode != 0:
        raise RuntimeError(f"{what} failed ({result.returncode}):\n"
                           f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    _say(f"  {what}: done in {time.monotonic() - started:.0f}s", quiet)


def wheel(*, quiet: bool = False) -> Path:
    """The llama-cpp-python wheel, compiled once (minutes) and then taken from the cache."""
    wheels = cache_dir() / "wheels"
    pattern = f"llama_cpp_python-{LLAMA_CPP_PYTHON}-*.whl"
    found = sorted(wheels.glob(pattern))
    if found:
        _say(f"wheel {found[0].name} (cached)", quiet)
        return found[0]
    wheels.mkdir(parents=True, exist_ok=True)
    jobs = str(os.cpu_count() or 2)
    env = {**os.environ, "CMAKE_ARGS": CMAKE_ARGS, "CMAKE_BUILD_PARALLEL_LEVEL": jobs,
           "MAKEFLAGS": f"-j{jobs}"}
    _say(f"compiling llama-cpp-python {LLAMA_CPP_PYTHON} (llama.cpp, CPU) with {jobs} jobs: "
         "once per machine, several minutes", quiet)
    with tempfile.TemporaryDirectory(dir=wheels) as tmp:
        _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-cache-dir", "-w", tmp,
              f"llama-cpp-python=={LLAMA_CPP_PYTHON}"], env=env, what="pip wheel", quiet=quiet)
        (built,) = Path(tmp).glob(pattern)
        target = wheels / built.name
        shutil.move(str(built), target)  # complete, or not there at all
    return target


def site_dir(*, quiet: bool = False) -> Path:
    """llama_cpp and everything llama_cpp.server imports, installed for this interpreter."""
    tag = f"py{sys.version_info.major}{sys.version_info.minor}"
    site = cache_dir() / f"llamacpp-site-{LLAMA_CPP_PYTHON}-{tag}"
    if (site / ".complete").exists():
        _say(f"site {site} (cached)", quiet)
        return site
    built = wheel(quiet=quiet)
    partial = site.with_name(site.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    _say(f"installing the wheel and the server's dependencies into {site}", quiet)
    _run([sys.executable, "-m", "pip", "install", "-q", "--no-compile", "--target",
          str(partial), str(built), *SERVER_REQUIREMENTS], what="pip install", quiet=quiet)
    shutil.rmtree(site, ignore_errors=True)
    partial.rename(site)
    (site / ".complete").write_text(f"{built.name}\n")
    return site


# The image's entry: llama-server's flags -> llama_cpp.server, plus /health and /metrics.
SHIM = r'''"""llama-server's command line on llama_cpp.server (devtools/llamacpp.py)."""

import argparse
import os
import sys

import uvicorn
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse

from llama_cpp.server.app import create_app
from llama_cpp.server.settings import Settings


def main() -> None:
    p = argparse.ArgumentParser(prog="llama-server (llama_cpp.server)")
    p.add_argument("-m", "--model", required=True)
    p.add_argument("-a", "--alias")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--metrics", action="store_true")
    p.add_argument("-c", "--ctx-size", type=int, default=512)
    p.add_argument("-t", "--threads", type=int, default=2)
    p.add_argument("-ngl", "--n-gpu-layers", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--api-key", default=os.environ.get("LLAMA_ARG_API_KEY"))
    a = p.parse_args()
    settings = Settings(model=a.model, model_alias=a.alias or a.model, host=a.host,
                        port=a.port, n_ctx=a.ctx_size, n_threads=a.threads,
                        n_threads_batch=a.threads, n_gpu_layers=a.n_gpu_layers, seed=a.seed,
                        verbose=False,
                        # By default a request waiting for the model (the agent's probe of
                        # /v1/models is one) cuts a streamed answer short; llama-server never
                        # does that.
                        interrupt_requests=False, api_key=a.api_key or None)
    app = create_app(settings=settings)  # loads the model: listening means ready
    flight = {"n": 0}

    @app.middleware("http")
    async def count(request: Request, call_next):  # type: ignore[no-untyped-def]
        work = request.url.path.endswith("completions")
        flight["n"] += work
        try:
            return await call_next(request)
        finally:
            flight["n"] -= work

    @app.get("/health")
    def health() -> JSONResponse:
        return JSONResponse({"status": "ok"})

    if a.metrics:
        @app.get("/metrics")
        def metrics() -> PlainTextResponse:
            n = flight["n"]
            return PlainTextResponse(
                "# TYPE llamacpp:requests_processing gauge\n"
                f"llamacpp:requests_processing {min(n, 1)}\n"
                "# TYPE llamacpp:requests_deferred gauge\n"
                f"llamacpp:requests_deferred {max(n - 1, 0)}\n")

    print(f"serving {a.model} as {settings.model_alias} on {a.host}:{a.port}", flush=True)
    uvicorn.run(app, host=a.host, port=a.port, log_level="warning")


if __name__ == "__main__":
    sys.exit(main())
'''


def image_spec(site: Path) -> ImageSpec:
    return ImageSpec(
        name=IMAGE,
        distributions=("llama_cpp_python", "uvicorn", "fastapi", "pydantic-settings",
                       "sse-starlette", "starlette-context", "PyYAML"),
        packages=(), entrypoint=("-m", "aivmm_llama_server"), user=("llama", 65532),
        site_paths=(str(site),), files=(("aivmm_llama_server.py", SHIM.encode()),),
        stdlib_keep=("sqlite3",))  # diskcache, which llama_cpp imports, needs it


def build_image(docker_host: str | None, *, quiet: bool = False) -> str:
    """Build (or reuse) ``aivmm-llamacpp``; returns ``aivmm-llamacpp:<hash>`` (also ``:local``)."""
    site = site_dir(quiet=quiet)
    return build_spec(docker_host, image_spec(site), quiet=quiet, extra_tags=("local",))


# --- the tiny model -----------------------------------------------------------------------

_WORDS = ("the of and to in is it you that he was for on are with as his they be at one have "
         "this from or had by hot word but what some we can out other were all there when up "
         "use your how said an each she which do their time if will way about many then them "
         "write would like so these her long make thing see him two has look more day could go "
         "come did number sound no most people my over know water than call first who may down "
         "side been now find any new work part take get place made live where after back little "
         "only round man year came show every good me give our under name very through just form "
         "sentence great think say help low line differ turn cause much mean before move right "
         "boy old too same tell does set three want air well also play small end put home read "
         "hand port large spell add even land here must big high such follow act why ask men "
         "change went light kind off need house picture try us again animal point mother world "
         "near build self earth father head stand own page should country found answer school "
         "grow study still learn plant cover food sun four between state keep eye never last let "
         "thought city tree cross farm hard start might story saw far sea draw left late run")
WORDS = _WORDS.split()


def _vocab() -> tuple[list[bytes], list[float], list[int]]:
    """A SentencePiece ("llama") vocabulary: <unk> <s> </s>, 256 byte tokens, then pieces."""
    from gguf import TokenType

    tokens = [b"<unk>", b"<s>", b"</s>"]
    types = [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL]
    tokens += [f"<0x{b:02X}>".encode() for b in range(256)]
    types += [TokenType.BYTE] * 256
    pieces: list[str] = ["\u2581"] + [chr(c) for c in range(ord("a"), ord("z") + 1)]
    pieces += [chr(c) for c in range(ord("A"), ord("Z") + 1)]
    pieces += ["\u2581" + w for w in WORDS]
    seen: set[str] = set()
    for piece in pieces:
        if piece not in seen and len(tokens) < 512:
            seen.add(piece)
            tokens.append(piece.encode())
            types.append(TokenType.NORMAL)
    # Longer pieces score higher so the tokenizer prefers whole words.
    scores = [0.0] * 259 + [float(len(t)) - 100.0 for t in tokens[259:]]
    return tokens, scores, [int(t) for t in types]


def write_model(path: Path, *, seed: int = MODEL_SEED) -> None:
    """Write the tiny llama GGUF to ``path`` (random weights from ``seed``)."""
    import numpy as np
    from gguf import GGUFWriter

    n_layer, n_embd, n_head, n_head_kv, n_ff, n_ctx = 4, 128, 4, 2, 344, 512
    tokens, scores, types = _vocab()
    n_vocab = len(tokens)
    rng = np.random.default_rng(seed)

    def weight(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.08).astype(np.float32)

    w = GGUFWriter(str(path), "llama")
    w.add_name("aivmm tiny llama (random weights)")
    w.add_context_length(n_ctx)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_rope_dimension_count(n_embd // n_head)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(0)  # all F32
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    w.add_chat_template("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n"
                        "{% endfor %}assistant:")
    kv = n_embd // n_head * n_head_kv
    # numpy shapes are ggml's reversed: token_embd {n_embd, n_vocab} is (n_vocab, n_embd).
    w.add_tensor("token_embd.weight", weight(n_vocab, n_embd))
    for i in range(n_layer):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(n_embd, dtype=np.float32))
        w.add_tensor(f"blk.{i}.attn_q.weight", weight(n_embd, n_embd))
        w.add_tensor(f"blk.{i}.attn_k.weight", weight(kv, n_embd))
        w.add_tensor(f"blk.{i}.attn_v.weight", weight(kv, n_embd))
        w.add_tensor(f"blk.{i}.attn_output.weight", weight(n_embd, n_embd))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(n_embd, dtype=np.float32))
        w.add_tensor(f"blk.{i}.ffn_gate.weight", weight(n_ff, n_embd))
        w.add_tensor(f"blk.{i}.ffn_up.weight", weight(n_ff, n_embd))
        w.add_tensor(f"blk.{i}.ffn_down.weight", weight(n_embd, n_ff))
    w.add_tensor("output_norm.weight", np.ones(n_embd, dtype=np.float32))
    w.add_tensor("output.weight", weight(n_vocab, n_embd))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def model(*, quiet: bool = False, seed: int = MODEL_SEED) -> Path:
    """The tiny GGUF, written once per seed and cached."""
    path = cache_dir() / "models" / f"tiny-llama-{seed}.gguf"
    if path.exists():
        _say(f"model {path} (cached)", quiet)
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    write_model(partial, seed=seed)
    partial.rename(path)
    _say(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)", quiet)
    return path


def main(argv: list[str] | None = None) -> None:
    """``python -m devtools.llamacpp``: build (or reuse) the image and the model."""
    parser = argparse.ArgumentParser(prog="python -m devtools.llamacpp", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docker-host", default=os.environ.get("DOCKER_HOST"),
                        help="engine URL, e.g. unix:///run/docker.sock (default DOCKER_HOST)")
    parser.add_argument("--no-image", action="store_true",
                        help="only the wheel, its site directory and the model")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    print(model(quiet=args.quiet))
    if args.no_image:
        print(site_dir(quiet=args.quiet))
    else:
        print(build_image(args.docker_host, quiet=args.quiet))


if __name__ == "__main__":
    main()
