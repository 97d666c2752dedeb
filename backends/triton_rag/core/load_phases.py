"""Cold loads phase by phase, read back from a tritonserver log: what the encoder stub and the engine print while a
model loads (`triton/encoder.py`, `engines/torch_encoder.py`, `engines/precompiled.py`, `engines/weight_arena.py`)
and the router's `loaded ... in` line. tools/bench_router.py tabulates them, so a benchmark reports each step of a
load, not just its total. Also what a stub can tell about its own start: its age, and imports that ran from source.
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field

#: phase name -> pattern of the engine's log line after "<model>: " (first group: seconds)
PHASES: dict[str, re.Pattern[str]] = {
    "stub_start_s": re.compile(r"stub process ([\d.]+) s old at initialize"),
    "cuda_context_s": re.compile(r"CUDA context ready in ([\d.]+) s"),
    "decoder_setup_s": re.compile(r" read onto .*; modules set up before it in ([\d.]+) s"),
    "checkpoint_s": re.compile(r"checkpoint read onto \w+: [\d.]+ GiB in ([\d.]+) s"),  # FP8 quantization included
    "weights_read_s": re.compile(r"weights read in ([\d.]+) s"),
    "weights_to_device_s": re.compile(r"weights read in [\d.]+ s, on \w+ in ([\d.]+) s"),
    "fp8_s": re.compile(r"linear layers quantized rowwise in ([\d.]+) s"),
    "arena_s": re.compile(r"weights in one arena: .* in ([\d.]+) s"),
    "compiled_layer_s": re.compile(r"(?:compiled layer loaded from \S+|layer compiled ahead of time) in ([\d.]+) s"),
    "first_batches_s": re.compile(r"first batches \(compilation\) ([\d.]+) s"),
    "graphs_s": re.compile(r"the other CUDA graphs ([\d.]+) s"),
    "initialized_at_s": re.compile(r"engine on .*; stub process ([\d.]+) s old"),
}
_MODEL_LINE = re.compile(r"^(\w+): (.*)$")
_ROUTER_LOADED = re.compile(r"^router: loaded (\w+) in ([\d.]+) s")


@dataclass
class ColdLoad:
    model: str
    phases: dict[str, float] = field(default_factory=dict)
    compiled_layer: str = ""  # "loaded" (a saved layer), "compiled" (and saved), or "" (neither line seen)
    total_s: float | None = None  # the router's measure, request to ready

    @property
    def unaccounted_s(self) -> float | None:
        """The part of `initialize` no phase covers (model construction, the reranker head, ...)."""
        end = self.phases.get("initialized_at_s")
        if end is None:
            return None
        named = sum(value for name, value in self.phases.items() if name != "initialized_at_s")
        return round(end - named, 2)


def cold_loads(log: str) -> list[ColdLoad]:
    """Every load in the log, in order. A load starts at its stub's first line and ends at the router's `loaded`
    line (or at the log's end, for a model loaded without the router)."""
    loads: list[ColdLoad] = []
    open_loads: dict[str, ColdLoad] = {}
    for line in log.splitlines():
        if (loaded := _ROUTER_LOADED.match(line)) is not None:
            if (load := open_loads.pop(loaded.group(1), None)) is not None:
                load.total_s = float(loaded.group(2))
            continue
        if (match := _MODEL_LINE.match(line)) is None or match.group(1) == "router":
            continue
        model, message = match.groups()
        if PHASES["stub_start_s"].search(message):
            open_loads[model] = ColdLoad(model)
            loads.append(open_loads[model])
        load = open_loads.get(model)
        if load is None:
            continue
        for name, pattern in PHASES.items():
            if (found := pattern.search(message)) is not None:
                load.phases[name] = float(found.group(1))
        if "compiled layer loaded from" in message:
            load.compiled_layer = "loaded"
        elif "layer compiled ahead of time" in message:
            load.compiled_layer = "compiled"
    return loads


def process_age_seconds() -> float:
    """How long this process has run (from /proc): at a stub's initialize, what its start and imports cost."""
    with open("/proc/self/stat") as stat, open("/proc/uptime") as uptime:
        started_ticks = int(stat.read().rsplit(")", 1)[1].split()[19])
        return float(uptime.read().split()[0]) - started_ticks / os.sysconf("SC_CLK_TCK")


#: The compiler's top-level packages: a load that finds its compiled layer's package imports none of them.
COMPILER_PACKAGES = ("torch._dynamo", "torch._inductor", "triton", "sympy")


def compiler_packages_imported() -> list[str]:
    """Which of `COMPILER_PACKAGES` this process has imported (none, after a load from a package)."""
    return [name for name in COMPILER_PACKAGES if name in sys.modules]


#: Imported by an encoder load (the compiler's modules only by a load that builds its package); compiled from
#: source, `import torch` alone took 3.4-4.6 s on the H200 host against 1.5-1.7 s with byte code (BENCHMARKS.md).
HEAVY_IMPORTS = ("torch", "torch._dynamo", "torch._inductor", "sympy")


def imported_without_bytecode(names: Iterable[str] = HEAVY_IMPORTS) -> list[str]:
    """The imported modules among `names` with no byte code cached: Python compiled their sources in this process and
    every later process will again (PYTHONDONTWRITEBYTECODE set, or read-only site-packages without .pyc files)."""
    missing = []
    for name in names:
        source = getattr(sys.modules.get(name), "__file__", None)
        if source is None or not source.endswith(".py"):
            continue
        try:
            cached = importlib.util.cache_from_source(source)  # honours PYTHONPYCACHEPREFIX
        except NotImplementedError:  # an interpreter without byte-code caching
            continue
        if not os.path.exists(cached):
            missing.append(name)
    return missing
