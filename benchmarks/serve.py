"""``mmgpt serve`` throughput: 16 concurrent clients against one client at a time, on the same requests.

    python benchmarks/serve.py                          # the shipped model, 16 clients, 64 requests
    python benchmarks/serve.py --clients 8 --requests 128
    python benchmarks/serve.py --model runs/shapes/export --max-batch-size 32
    python benchmarks/serve.py --random-model 384 8      # a wider decoder (n_embd 384, 8 layers), random weights

The server runs as its own process (``python -m mmgpt.commands.serve``), as it would be deployed; the clients are
coroutines of this one, each with a keep-alive HTTP connection, sending OpenAI chat completion requests: a mix of
image questions and captions (the example images as data URLs) and text-only questions, greedy (temperature 0),
the server's default max_tokens. The same request list is sent twice, first by one client at a time, then by
``--clients`` clients at once, each taking the next request when its previous one is answered (closed loop).
Every concurrent answer must equal the serial answer to the same request: batching must not change an answer.

* **requests/s**: requests / wall time of the phase.
* **tokens/s**: completion tokens (``usage.completion_tokens``, eos included) / wall time.
* **latency p50 / p95**: per request, from sending it to the end of its response.
* **mean batch**: requests per decoded batch, joined ones included, from the server's ``/health`` counters.
* **rows/step**: rows decoded per decode step (``row_steps / steps`` of ``/health``): how full the batch runs.
* **joined**: the share of requests that joined a running batch (continuous batching).

``--random-model N_EMBD N_LAYER`` serves the shipped model's architecture with a wider, deeper decoder and random
weights (saved to a temporary directory): its greedy answers run to max_tokens, as a larger model's longer answers
do, and show batching where a decode step is bound by its weights rather than by Python.

Prints Markdown (benchmarks/README.md records results).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "assets" / "examples"
TEXT_QUESTIONS = [
    "What is one plus one?", "How many sides does a triangle have?", "Name a shape.", "What color is the sky?",
    "How many corners does a square have?", "Is a circle round?",
]


def requests_mix(n: int, prompts: str = "mix") -> list[dict]:
    """``n`` chat requests. ``"mix"``: for each example image its caption and its questions, and text-only
    questions, in turn (two image requests per text one); most answers are a word or two. ``"captions"``: only
    captions of the example images (about 17 tokens each)."""
    examples = json.loads((EXAMPLES / "examples.json").read_text())
    image_prompts = []
    for e in examples:
        url = "data:image/png;base64," + base64.b64encode((EXAMPLES / e["file"]).read_bytes()).decode()
        for text in ["Describe the image.", *(q["question"] for q in e["questions"])]:
            image_prompts.append([{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}])
    if prompts == "captions":
        image_prompts = [p for p in image_prompts if p[1]["text"] == "Describe the image."]
        return [{"messages": [{"role": "user", "content": image_prompts[i % len(image_prompts)]}], "temperature": 0}
                for i in range(n)]
    out = []
    for i in range(n):
        content = TEXT_QUESTIONS[(i // 3) % len(TEXT_QUESTIONS)] if i % 3 == 2 else image_prompts[
            (i - i // 3) % len(image_prompts)]
        out.append({"messages": [{"role": "user", "content": content}], "temperature": 0})
    return out


def random_model(n_embd: int, n_layer: int, directory: Path) -> str:
    """The shipped model's config with an ``n_embd`` x ``n_layer`` decoder (heads of 64), random weights, saved to
    ``directory``; returns its path."""
    import dataclasses

    import torch

    import mmgpt

    shipped = mmgpt.load()
    config = shipped.model.config
    decoder = dataclasses.replace(config.decoder, n_embd=n_embd, n_layer=n_layer, n_head=n_embd // 64,
                                  n_query_groups=n_embd // 64)
    config = dataclasses.replace(config, decoder=decoder)
    torch.manual_seed(0)
    model = mmgpt.create_model(config)
    mmgpt.Pipeline(model, shipped.tokenizer).save_pretrained(directory)
    params = sum(p.numel() for p in model.parameters())
    print(f"random model: decoder n_embd {n_embd}, {n_layer} layers; {params / 1e6:.1f} M parameters\n")
    return str(directory)


def start_server(args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "mmgpt.commands.serve", "--port", str(port), "--log-level", "warning",
               "--max-batch-size", str(args.max_batch_size)]
    if args.model:
        command += ["--model", args.model]
    if args.server_threads:
        command += ["--threads", str(args.server_threads)]
    process = subprocess.Popen(command, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with status {process.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    process.terminate()
    raise RuntimeError("the server did not start within 120 s")


def run_phase(url: str, requests: list[dict], clients: int) -> dict:
    """Send every request, ``clients`` at a time; returns the answers (in request order) and the timings."""
    return asyncio.run(_run_phase(url, requests, clients))


async def _run_phase(url: str, requests: list[dict], clients: int) -> dict:
    # One event loop drives every client: 16 client threads would spend more CPU contending for the GIL than the
    # server spends answering them, on the machine the server runs on.
    answers: list = [None] * len(requests)
    latencies: list = [None] * len(requests)
    todo = iter(range(len(requests)))

    async def client(http: httpx.AsyncClient) -> None:
        for i in todo:  # each client takes the next request when its previous one is answered
            start = time.perf_counter()
            r = await http.post("/v1/chat/completions", json=requests[i])
            latencies[i] = time.perf_counter() - start
            if r.status_code != 200:
                raise RuntimeError(f"request {i} failed: {r.text}")
            body = r.json()
            answers[i] = (body["choices"][0]["message"]["content"], body["usage"]["completion_tokens"])

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as http:
        before = (await http.get("/health")).json()
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        wall = time.perf_counter() - start
        after = (await http.get("/health")).json()
    tokens = sum(a[1] for a in answers)
    delta = {key: after.get(key, 0) - before.get(key, 0) for key in ("batches", "requests", "joined", "steps",
                                                                        "row_steps")}
    return dict(
        answers=answers, wall=wall, rps=len(requests) / wall, tps=tokens / wall, tokens=tokens,
        p50=statistics.median(latencies), p95=statistics.quantiles(latencies, n=20)[-1],
        batch=delta["requests"] / max(delta["batches"], 1),
        # A server without these counters (before continuous batching) shows "-".
        rows_per_step=delta["row_steps"] / delta["steps"] if delta["steps"] else None,
        joined=delta["joined"] / len(requests) if "joined" in after else None,
    )


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                flags = Path("/proc/cpuinfo").read_text()
                return f"{line.split(':', 1)[1].strip()} ({'AVX-512' if 'avx512f' in flags else 'no AVX-512'})"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients in the second phase")
    parser.add_argument("--requests", type=int, default=64, help="requests per phase")
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--model", default=None, help="exported directory or .ckpt (default: the shipped model)")
    parser.add_argument("--random-model", type=int, nargs=2, metavar=("N_EMBD", "N_LAYER"), default=None,
                        help="serve the shipped architecture with this decoder width and depth, random weights")
    parser.add_argument("--server-threads", type=int, default=None,
                        help="the server's torch threads (mmgpt serve --threads; default: torch's, one per core)")
    parser.add_argument("--warmup", type=int, default=8, help="untimed requests first")
    parser.add_argument("--prompts", choices=["mix", "captions"], default="mix",
                        help="mix: image questions, captions and text questions; captions: longer answers only")
    args = parser.parse_args()

    requests = requests_mix(args.requests, args.prompts)
    if args.random_model:
        import tempfile

        args.model = random_model(*args.random_model, Path(tempfile.mkdtemp(prefix="mmgpt-serve-bench-")))
    process, url = start_server(args)
    try:
        run_phase(url, requests_mix(args.warmup, args.prompts), min(args.clients, args.warmup))
        serial = run_phase(url, requests, 1)
        concurrent = run_phase(url, requests, args.clients)
    finally:
        process.terminate()
        process.wait(30)

    same = sum(a == b for a, b in zip(serial["answers"], concurrent["answers"], strict=True))
    print(f"{cpu_name()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at the end; "
          f"{args.requests} requests ({args.prompts}: {sum('image_url' in json.dumps(r) for r in requests)} with an "
          f"image, {serial['tokens'] / len(requests):.1f} completion tokens each), greedy, max batch "
          f"{args.max_batch_size}, server threads {args.server_threads or 'torch default'}\n")
    print("| clients | requests/s | tokens/s | latency p50 (ms) | latency p95 (ms) | mean batch | rows/step | joined |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for clients, r in ((1, serial), (args.clients, concurrent)):
        rows = "-" if r["rows_per_step"] is None else f"{r['rows_per_step']:.1f}"
        joined = "-" if r["joined"] is None else f"{r['joined']:.0%}"
        print(f"| {clients} | {r['rps']:.1f} | {r['tps']:,.0f} | {r['p50'] * 1e3:.0f} | {r['p95'] * 1e3:.0f} | "
              f"{r['batch']:.1f} | {rows} | {joined} |")
    print(f"\n{args.clients} clients vs 1: {concurrent['rps'] / serial['rps']:.2f}x requests/s, "
          f"{concurrent['tps'] / serial['tps']:.2f}x tokens/s; {same}/{len(requests)} answers equal the serial ones")
    if same != len(requests):
        raise SystemExit("some concurrent answers differ from the serial ones")


if __name__ == "__main__":
    main()
