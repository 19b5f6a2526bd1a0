"""Run llama.cpp's own C++ HTTP server (PyPI ``xllamacpp``) until terminated.

The peer of ``embedded_vs_llamacpp.py``; run by ``.venv-bench``'s Python (``make bench-env``
installs xllamacpp there, not in tokenwire's runtime dependencies):

    .venv-bench/bin/python benchmarks/_xllamacpp_server.py --model M.gguf --port P \
        --threads 2 --parallel 8 --ctx 4096
"""

from __future__ import annotations

import argparse
import signal
import threading


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--parallel", type=int, default=8, help="slots (concurrent streams)")
    parser.add_argument("--ctx", type=int, default=4096, help="context per slot")
    args = parser.parse_args()

    import xllamacpp as xlc  # type: ignore[import-not-found]

    params = xlc.CommonParams()
    params.model.path = args.model
    params.hostnames = ["127.0.0.1"]
    params.port = args.port
    params.n_parallel = args.parallel
    params.n_ctx = args.ctx * args.parallel  # llama-server splits n_ctx among its slots
    params.cpuparams.n_threads = args.threads
    params.cpuparams_batch.n_threads = args.threads
    params.cache_prompt = True
    params.warmup = True
    server = xlc.Server(params)
    print(f"listening on {server.listening_address}", flush=True)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    done.wait()
    del server


if __name__ == "__main__":
    main()
