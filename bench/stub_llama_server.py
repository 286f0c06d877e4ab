#!/usr/bin/env python3
"""llama-server's command line over bench/stub_engine.py, so a node agent can start stub engines.

PORTEN_LLAMA_SERVER_BIN=bench/stub_llama_server.py makes the agent's `llamacpp` engine run this as
`BIN -m MODEL_PATH --host H --port P -c CTX --alias NAME [--no-jinja --chat-template FMT] [-ngl N]`.
It checks that the model file exists (as llama-server does), never reads it, and serves the stub
on H:P with llama-server's parallel slots (-np, default 4): completions beyond them wait inside it.
The arguments Porten cannot pass come from the environment the agent hands down to its engines:
PORTEN_STUB_SLOTS, PORTEN_STUB_TOKENS, PORTEN_STUB_TOKEN_DELAY_MS. It needs only the standard library.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from stub_engine import serve  # noqa: E402  (a sibling file, found through the path above)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-m", "--model", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("-c", "--ctx-size", type=int, default=4096)
    parser.add_argument("-a", "--alias", default="")
    parser.add_argument("--no-jinja", action="store_true")
    parser.add_argument("--chat-template", default="")
    parser.add_argument("-ngl", "--n-gpu-layers", default="0")
    parser.add_argument("-np", "--parallel", type=int, default=int(os.environ.get("PORTEN_STUB_SLOTS", "4")))
    parser.add_argument("--tokens", type=int, default=int(os.environ.get("PORTEN_STUB_TOKENS", "16")))
    parser.add_argument("--token-delay-ms", type=float,
                        default=float(os.environ.get("PORTEN_STUB_TOKEN_DELAY_MS", "8")))
    args, ignored = parser.parse_known_args(argv)
    if not Path(args.model).is_file():
        print(f"stub llama-server: failed to load model '{args.model}': no such file", flush=True)
        return 1
    print(f"stub llama-server: {args.alias or args.model} on {args.host}:{args.port}, {args.parallel} slots, "
          f"{args.tokens} tokens {args.token_delay_ms:g} ms apart"
          + (f"; ignored {' '.join(ignored)}" if ignored else ""), flush=True)
    try:
        asyncio.run(serve(args.port, args.tokens, args.token_delay_ms / 1000, host=args.host, slots=args.parallel))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
