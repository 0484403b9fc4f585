"""`gptjax serve` under load: 1, 8 and 32 clients at once, each sending greedy completions back to
back; generated tokens per second in all, latency per request (p50, p99), and whether every
answer is the one that prompt gets alone (nothing lost, nothing mixed up between slots).

    python benchmarks/serve_load.py --checkpoint out/shakespeare_char_cpu      # after scripts/demo.sh
    python benchmarks/serve_load.py --checkpoint out/gpt2 --max-tokens 128 --slots 32

The server runs in a process of its own, as a user starts it (`gptjax serve --port 0`).
"""

import argparse
import concurrent.futures
import subprocess
import sys
import time

import numpy as np
import openai

PROMPTS = ["ROMEO:", "JULIET:\nO", "First Citizen:\n", "KING HENRY", "To be, or", "MENENIUS:\nW", "What is",
           "Thou art", "LADY ANNE:", "Good my lord", "HAMLET:\n", "O, that", "Now is the", "BRUTUS:", "Come,", "Ay, sir"]


def start_server(checkpoint: str, slots: int):
  process = subprocess.Popen([sys.executable, "-m", "gptjax.cli", "serve", "--checkpoint", checkpoint, "--port", "0",
                              "--slots", str(slots)], stdout=subprocess.PIPE, text=True)
  line = process.stdout.readline()
  if " at http://" not in line:
    process.kill()
    raise SystemExit(f"the server did not start: {line!r}")
  return process, line.split(" at ")[-1].strip()


def load(client, model: str, clients: int, per_client: int, max_tokens: int, alone: dict) -> dict:
  """Each of `clients` threads sends `per_client` requests back to back."""

  def one(i: int):
    prompt = PROMPTS[i % len(PROMPTS)]
    began = time.perf_counter()
    reply = client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0)
    return time.perf_counter() - began, reply.usage.completion_tokens, reply.choices[0].text == alone[prompt]

  began = time.perf_counter()
  with concurrent.futures.ThreadPoolExecutor(clients) as pool:
    results = list(pool.map(one, range(clients * per_client)))
  elapsed = time.perf_counter() - began
  latencies = np.array([r[0] for r in results])
  return {"clients": clients, "requests": len(results), "tokens": sum(r[1] for r in results),
          "tokens_per_s": sum(r[1] for r in results) / elapsed, "p50": np.percentile(latencies, 50),
          "p99": np.percentile(latencies, 99), "same_as_alone": sum(r[2] for r in results)}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--checkpoint", default="out/shakespeare_char_cpu")
  parser.add_argument("--slots", type=int, default=32)
  parser.add_argument("--clients", default="1,8,32")
  parser.add_argument("--per-client", type=int, default=4, help="requests each client sends, one after another")
  parser.add_argument("--max-tokens", type=int, default=48)
  parser.add_argument("--rounds", type=int, default=3)
  args = parser.parse_args()
  process, base_url = start_server(args.checkpoint, args.slots)
  try:
    client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=600)
    model = client.models.list().data[0].id
    alone = {p: client.completions.create(model=model, prompt=p, max_tokens=args.max_tokens, temperature=0)
             .choices[0].text for p in PROMPTS}  # also compiles every prompt bucket
    load(client, model, 1, 1, args.max_tokens, alone)  # warm-up
    rounds = [[load(client, model, int(n), args.per_client, args.max_tokens, alone) for n in args.clients.split(",")]
              for _ in range(args.rounds)]  # the client counts alternated, medians over the rounds
    rows = [{key: (np.median([r[i][key] for r in rounds]) if key in ("tokens_per_s", "p50", "p99")
                   else sum(r[i][key] for r in rounds)) for key in rounds[0][i]} | {"clients": rounds[0][i]["clients"]}
            for i in range(len(rounds[0]))]
  finally:
    process.terminate()
    process.wait(timeout=60)
  print(f"gptjax serve {args.checkpoint}, {args.slots} slots, greedy, {args.max_tokens} new tokens per request, "
        f"medians of {args.rounds} rounds")
  print(f"{'clients':>7} {'requests':>8} {'tokens':>7} {'tokens/s':>9} {'vs 1':>6} {'p50 s':>7} {'p99 s':>7} "
        f"{'same as alone':>13}")
  for row in rows:
    print(f"{row['clients']:>7} {row['requests']:>8} {row['tokens']:>7} {row['tokens_per_s']:>9.0f} "
          f"{row['tokens_per_s'] / rows[0]['tokens_per_s']:>5.1f}x {row['p50']:>7.3f} {row['p99']:>7.3f} "
          f"{row['same_as_alone']:>6}/{row['requests']}")


if __name__ == "__main__":
  main()
