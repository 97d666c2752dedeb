"""Docling VLM benchmark: our engine (TorchVlm) against transformers' `generate` on the same pages, same run, same card.

A granite-docling-shaped model (Idefics3: SigLIP2-base 512 px tower, 30-layer 576-wide Granite decoder, random
bfloat16 weights) converts Letter pages rendered at 144 dpi (17 tiles, a 1142-token prompt). Random weights never
write a stop token, so every page generates exactly --new-tokens tokens (stop tokens are off for both sides).
Both sides get identical inputs: the pixel values and prompt ids come from our preprocessing (checked against
transformers' processor in tests/test_idefics3.py), so only the model execution is compared.

- transformers: `generate(do_sample=False, max_new_tokens=N, min_new_tokens=N)`, once with the checkpoint's own
  generation config (granite-docling ships `use_cache: false`, what a user gets by default) and once with
  `use_cache=True` (the strong baseline);
- ours: `TorchVlm.generate` (per-page prefill into one preallocated KV cache, batched greedy decode).

    python tools/bench_docling.py --out bench_results/docling            # GPU: real shape
    python tools/bench_docling.py --shape tiny --new-tokens 16 --out /tmp/d   # CPU smoke run
Writes docling.json and docling.md (a table for BENCHMARKS.md) under --out.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from benchlib import markdown_table, timed
from PIL import Image, ImageDraw

from triton_rag.build.offline_docling import GRANITE_DOCLING_TEXT, GRANITE_DOCLING_VISION, build_random_granite_docling
from triton_rag.core import logs
from triton_rag.core.docling_prompt import GRANITE_CHAT
from triton_rag.core.idefics3 import ImageProcessorConfig, normalize, preprocess
from triton_rag.engines.torch_vlm import PageInput, TorchVlm


def log(message: str) -> None:
    print(f"[bench_docling {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def synthetic_page(seed: int, size: tuple[int, int] = (1224, 1584)) -> Image.Image:
    """A Letter page at 144 dpi with a heading, paragraphs and a table grid (the model's content does not matter
    for speed; its shape does: 17 tiles)."""
    rng = np.random.default_rng(seed)
    page = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(page)
    draw.text((120, 100), f"Report {seed}: quarterly results", fill="black")
    y = 180
    for _ in range(30):
        words = " ".join("".join(rng.choice(list("abcdefghij"), 6)) for _ in range(12))
        draw.text((120, y), words, fill="black")
        y += 28
    for row in range(6):
        for col in range(4):
            draw.rectangle((120 + col * 240, 1100 + row * 40, 360 + col * 240, 1140 + row * 40), outline="black")
    return page


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=("granite-docling-258m", "tiny"), default="granite-docling-258m")
    parser.add_argument("--pages", type=int, default=8)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--eager-too", action="store_true", help="also time our engine without CUDA graphs")
    parser.add_argument("--skip-nocache", action="store_true", help="skip generate with use_cache=False (slow)")
    parser.add_argument("--work", type=Path, default=Path(".cache/bench"))
    parser.add_argument("--cache", type=Path, default=Path(".cache"))
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    logs.configure()  # the library's progress lines (model builds, tokenizer download) on stderr
    from transformers import Idefics3ForConditionalGeneration

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = "bfloat16" if device.type == "cuda" else "float32"
    real = args.shape != "tiny"
    model_dir = build_random_granite_docling(
        args.work / f"granite-docling-{args.shape}-{dtype}",
        args.cache,
        GRANITE_DOCLING_TEXT if real else None,
        GRANITE_DOCLING_VISION if real else None,
        log,
        dtype,
        "cuda" if device.type == "cuda" else "cpu",
    )
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    config = ImageProcessorConfig.from_preprocessor_config(
        json.loads((model_dir / "preprocessor_config.json").read_text())
    )
    from triton_rag.core.idefics3 import image_prompt

    pages = [synthetic_page(seed) for seed in range(args.pages)]
    before, after = GRANITE_CHAT.format(prompt="Convert this page to docling.").split("<image>")
    start = time.perf_counter()
    inputs = []
    for page in pages:
        tiles = preprocess(page, config)
        ids = tokenizer(before + image_prompt(tiles.rows, tiles.cols, config) + after, add_special_tokens=False)
        inputs.append(PageInput(tiles.pixels, np.array(ids["input_ids"], dtype=np.int64)))
    preprocess_seconds = (time.perf_counter() - start) / len(pages)
    prompt_tokens = len(inputs[0].input_ids)
    log(f"{len(pages)} pages, {len(inputs[0].pixels)} tiles and {prompt_tokens} prompt tokens each")

    engine = TorchVlm(model_dir, dtype=dtype, device=device.type)
    reference = Idefics3ForConditionalGeneration.from_pretrained(str(model_dir), dtype=engine.dtype).to(device).eval()
    n = args.new_tokens
    results: list[dict[str, Any]] = []

    def record(name: str, batch: int, seconds: float, tokens: int, peak: int) -> None:
        row = {
            "engine": name,
            "batch": batch,
            "pages": len(pages),
            "new_tokens_per_page": n,
            "seconds": round(seconds, 3),
            "pages_per_s": round(len(pages) / seconds, 3),
            "decode_tokens_per_s": round(tokens / seconds, 1),
            "peak_gib": round(peak / 2**30, 2),
        }
        results.append(row)
        log(json.dumps(row))

    def hf_batch(group: list[PageInput], use_cache: bool) -> list[list[int]]:
        width = max(len(p.input_ids) for p in group)
        images = max(len(p.pixels) for p in group)
        ids = torch.full((len(group), width), 100257, dtype=torch.long)
        mask = torch.zeros((len(group), width), dtype=torch.long)
        pixel_values = torch.zeros((len(group), images, 3, 512, 512), dtype=torch.float32)
        for row, page in enumerate(group):
            ids[row, width - len(page.input_ids) :] = torch.from_numpy(page.input_ids)
            mask[row, width - len(page.input_ids) :] = 1
            pixel_values[row, : len(page.pixels)] = torch.from_numpy(normalize(page.pixels, config))
        out = reference.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            pixel_values=pixel_values.to(device, engine.dtype),
            do_sample=False,
            max_new_tokens=n,
            min_new_tokens=n,
            use_cache=use_cache,
            eos_token_id=None,
            pad_token_id=100257,
        )
        return out[:, width:].tolist()

    def run_all(fn: Callable[[list[PageInput]], list[list[int]]], batch: int) -> list[list[int]]:
        generated: list[list[int]] = []
        for start in range(0, len(inputs), batch):
            generated += fn(inputs[start : start + batch])
        return generated

    def ours_fn(group: list[PageInput]) -> list[list[int]]:
        return engine.generate(group, n, ())

    def theirs_fn(group: list[PageInput]) -> list[list[int]]:
        return hf_batch(group, True)

    agreement: dict[str, float] = {}
    for batch in args.batches:
        engine.generate(inputs[:batch], 4, ())  # warm-up (kernels, allocator)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        ours, seconds = timed(lambda b=batch: run_all(ours_fn, b), device)
        peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else 0
        decode = "CUDA graph decode" if engine.use_graphs else "eager decode"
        record(f"ours (TorchVlm, {decode})", batch, seconds, sum(map(len, ours)), peak)
        if args.eager_too and device.type == "cuda":
            engine.use_graphs = False
            eager, seconds = timed(lambda b=batch: run_all(ours_fn, b), device)
            engine.use_graphs = True
            record("ours (TorchVlm, eager decode)", batch, seconds, sum(map(len, eager)), 0)
            agreement[f"batch {batch} graph vs eager"] = round(
                float(np.mean([np.mean(np.array(x) == np.array(y)) for x, y in zip(ours, eager, strict=True)])), 4
            )
        hf_batch(inputs[:batch], True)  # warm-up
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        theirs, seconds = timed(lambda b=batch: run_all(theirs_fn, b), device)
        peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else 0
        record("transformers generate, use_cache=True", batch, seconds, sum(map(len, theirs)), peak)
        same = [sum(a == b for a, b in zip(x, y, strict=True)) / n for x, y in zip(ours, theirs, strict=True)]
        first_diff = [
            next((i for i, (a, b) in enumerate(zip(x, y, strict=True)) if a != b), n)
            for x, y in zip(ours, theirs, strict=True)
        ]
        agreement[f"batch {batch}"] = round(float(np.mean(same)), 4)
        agreement[f"batch {batch} first differing position (median)"] = float(np.median(first_diff))
    if not args.skip_nocache:
        few = inputs[: min(2, len(inputs))]
        short = max(8, n // 8)  # without a cache every step reruns the whole prompt: measure a few steps only
        saved = n
        n = short
        _, seconds = timed(lambda: [hf_batch([p], False) for p in few], device)
        n = saved
        row = {
            "engine": "transformers generate, as shipped (use_cache=False)",
            "batch": 1,
            "pages": len(few),
            "new_tokens_per_page": short,
            "seconds": round(seconds, 3),
            "pages_per_s": None,
            "decode_tokens_per_s": round(len(few) * short / seconds, 1),
            "peak_gib": None,
        }
        results.append(row)
        log(json.dumps(row))

    summary = {
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "shape": args.shape,
        "dtype": dtype,
        "prompt_tokens": prompt_tokens,
        "tiles_per_page": len(inputs[0].pixels),
        "preprocess_seconds_per_page": round(preprocess_seconds, 4),
        "greedy_agreement_ours_vs_transformers": agreement,
        "results": results,
        "command": "python " + " ".join(sys.argv),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "docling.json").write_text(json.dumps(summary, indent=2))
    header = ("engine", "batch", "pages", "new tokens/page", "pages/s", "decode tokens/s", "peak GiB")
    keys = ("engine", "batch", "pages", "new_tokens_per_page", "pages_per_s", "decode_tokens_per_s", "peak_gib")
    lines = markdown_table(header, [[row[key] for key in keys] for row in results])
    (args.out / "docling.md").write_text("\n".join(lines) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
