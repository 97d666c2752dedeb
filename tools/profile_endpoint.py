"""Where a short query's time goes through the prepared repository (`make prepare`): sequential one-text requests to
`qwen_embed`, then the same token count straight to its encoder model, each with the client's p50/p90 and Triton's own
per-model times (endpoint execute, encoder execute, the router's ACQUIRE/RELEASE). Runs on any machine; on a CPU
with the tiny offline models it measures the endpoint's own overhead (tokenization, BLS round trips).

    python tools/profile_endpoint.py --requests 400
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient
from benchlib import time_per_model

from triton_rag import contract
from triton_rag.server import TritonServer, free_ports

QUERY = "what is the capital city of france and why is it called that"
QUERY_TOKENS = 16


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--cache", type=Path, default=Path(".cache"))
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--log", type=Path, default=Path(".cache/profile_endpoint-server.log"))
    args = parser.parse_args()
    with open(args.log, "wb") as log:
        server = TritonServer(args.repository, args.cache, free_ports(), log=log)
        server.start()
        try:
            server.wait_ready(600)
            client = grpcclient.InferenceServerClient(server.grpc_url)

            def embed() -> None:
                text = grpcclient.InferInput("TEXT", [1, 1], "BYTES")
                text.set_data_from_numpy(np.array([[QUERY.encode()]], dtype=object))
                client.infer(contract.EMBED_ENDPOINT, [text])

            def direct() -> None:
                inputs = []
                for name, values in (("INPUT_IDS", np.arange(100, 100 + QUERY_TOKENS)), ("ATTENTION_MASK", 1)):
                    tensor = grpcclient.InferInput(name, [1, QUERY_TOKENS], "INT64")
                    tensor.set_data_from_numpy(np.broadcast_to(values, (1, QUERY_TOKENS)).astype(np.int64))
                    inputs.append(tensor)
                client.infer(contract.EMBED_ENCODER, inputs)

            calls: dict[str, Callable[[], None]] = {"endpoint": embed, "encoder alone": direct}
            for call in calls.values():  # the router loads the encoder on the first call
                for _ in range(30):
                    call()
            for name, call in calls.items():
                before = client.get_inference_statistics(as_json=True)
                times = []
                for _ in range(args.requests):
                    started = time.perf_counter()
                    call()
                    times.append((time.perf_counter() - started) * 1e3)
                p50, p90 = np.percentile(times, [50, 90])
                print(f"{name}: p50 {p50:.2f} ms, p90 {p90:.2f} ms over {args.requests} requests")
                print(json.dumps(time_per_model(client, before)), flush=True)
        finally:
            server.stop()


if __name__ == "__main__":
    main()
