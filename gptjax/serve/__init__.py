"""Serving a checkpoint over OpenAI's completions API (and chat completions, where the tokenizer
has a chat template), with continuous batching.

    gptjax serve --checkpoint out/shakespeare_char_cpu                 # http://127.0.0.1:8000/v1
    gptjax serve --checkpoint out/gpt2 --port 8080 --slots 32 mesh.tensor=2
    curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
        -d '{"prompt": "ROMEO:", "max_tokens": 50, "temperature": 0}'

Requests are decoded together in `--slots` rows of one key/value cache (`engine`); new ones join
at the next step, finished ones leave, and requests beyond the slots wait their turn. The
parameters are placed on the mesh as `gptjax sample` places them (`mesh.*`). Any OpenAI client
talks to it (`base_url=http://HOST:PORT/v1`), and so does lm-evaluation-harness's
`local-completions` model (`tokenizer_backend=remote`). Needs the `serve` extra
(`pip install gptjax[serve]`: FastAPI, uvicorn, sse-starlette).
"""

import argparse
import os
import socket

from gptjax import checkpoint
from gptjax.errors import UserError


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(prog="gptjax serve", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  checkpoint.add_inference_arguments(parser)
  parser.add_argument("--host", default="127.0.0.1")
  parser.add_argument("--port", type=int, default=8000, help="0 takes a free port (printed at start)")
  parser.add_argument("--slots", type=int, default=16, help="requests decoded together (rounded up to a multiple "
                      "of the mesh's batch shards)")
  parser.add_argument("--model-name", default=None, help="the model's name in the API (default: the checkpoint "
                      "folder's name)")
  args = parser.parse_intermixed_args(argv)
  try:
    import fastapi  # noqa: F401
    import sse_starlette  # noqa: F401
    import uvicorn
  except ImportError as e:
    raise UserError(f"gptjax serve needs the serve extra (pip install 'gptjax[serve]'): {e.name} is missing") from None
  if args.slots < 1:
    raise UserError(f"--slots={args.slots} is not positive")
  listener = _listen(args.host, args.port)  # before loading: a port in use is refused at once

  from gptjax.serve.api import create_app
  from gptjax.serve.engine import Engine
  cfg, tok, params, step, mesh = checkpoint.load_model(args.checkpoint, args.step, args.mesh)
  engine = Engine(cfg.model, params, tok, mesh, args.slots).start()
  name = args.model_name or os.path.basename(os.path.normpath(args.checkpoint))
  host, port = listener.getsockname()[:2]
  print(f"gptjax serve: {name} (step {step}, {engine.slots} slots) at http://{host}:{port}/v1", flush=True)
  uvicorn.Server(uvicorn.Config(create_app(engine, name), log_level="warning")).run(sockets=[listener])


def _listen(host: str, port: int) -> socket.socket:
  try:
    listener = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
  except (OSError, OverflowError) as e:  # OverflowError: a port outside [0, 65535]
    raise UserError(f"cannot listen on {host}:{port}: {getattr(e, 'strerror', None) or e}") from None
  return listener
