"""The compute models `qwen_embed_encoder` and `qwen_rerank_encoder` as python models: the PyTorch engine (CUDA
when present), or a TensorRT-RTX engine when the repository chose that variant (`engine_file` parameter). The
tensorrt_plan variant of the same contract is Triton's TensorRT backend instead (docs/ENGINES.md).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from triton_rag import contract
from triton_rag.contract.params import EncoderParameters
from triton_rag.core.admin import KEY_NAME, key_matches, server_key
from triton_rag.core.errors import BadInput, Forbidden
from triton_rag.core.load_phases import imported_without_bytecode, process_age_seconds
from triton_rag.engines.torch_encoder import TorchEncoder
from triton_rag.engines.trt_rtx_encoder import TrtRtxEncoder
from triton_rag.triton.common import answer_each, model_parameters, stub_logger


class EncoderModel:
    def initialize(self, args: dict[str, str]) -> None:
        self.engine: TorchEncoder | TrtRtxEncoder
        params = EncoderParameters.parse(model_parameters(args))
        task = params.task
        self.output_name = "POOLED" if task == "embed" else "LOGITS"
        version_dir = Path(args["model_repository"]) / args["model_version"]
        self.log = stub_logger(args)
        self.log.info(
            f"stub process {process_age_seconds():.1f} s old at initialize (its start and "
            "imports, torch included: the first phase of a cold load)"
        )
        if params.engine_file is not None:  # the python_trt_rtx variant: a TensorRT-RTX engine built for this GPU
            self.engine = TrtRtxEncoder(version_dir / params.engine_file, version_dir / "hf", self.output_name)
            self.log.info(f"{task} engine: TensorRT-RTX {params.engine_file}")
            return
        options = params.pytorch
        assert options is not None  # the PyTorch engine's parameters, where there is no engine_file
        self.engine = TorchEncoder(
            version_dir / "hf",
            task=task,
            pooling=params.pooling or "last_token",  # None for a reranker, which reads its last token
            dtype=options.dtype,
            yes_no_ids=params.yes_no_ids,
            precision=options.precision,
            compile_model=options.compile,
            max_batch_tokens=options.max_batch_tokens,
            sleepable=options.sleepable,
            device_memory_cap=options.device_memory_cap,
            host_embeddings=options.embedding_table == "host",
            release_context_asleep=options.release_context_asleep,
            log=self.log.info,
        )
        self.log.info(
            f"{task} engine on {self.engine.device} in {self.engine.precision}, "
            f"hidden size {self.engine.hidden_size}; stub process {process_age_seconds():.1f} s old"
        )
        if uncached := imported_without_bytecode():
            self.log.warning(
                f"warning: no byte code is cached for {', '.join(uncached)}, so every load "
                "compiles their sources again (`import torch` alone: 3.4-4.6 s against 1.5-1.7 s on the H200 host). "
                "Byte-compile site-packages once (python -m compileall -q <site-packages>), or unset "
                "PYTHONDONTWRITEBYTECODE and point PYTHONPYCACHEPREFIX at a writable directory"
            )

    def execute(self, requests: list[Any]) -> list[Any]:
        return answer_each(requests, self._compute, self.log)

    def _compute(self, request: Any) -> list[Any]:
        parameters = json.loads(request.parameters() or "{}")
        action = parameters.get(contract.RESIDENCY_PARAMETER)
        if action is not None:  # a control request from the router: no forward pass
            if action != "status" and not key_matches(str(parameters.get(KEY_NAME, "")) or None, self._admin_key()):
                raise Forbidden(
                    f"residency '{action}' needs the admin key in the request parameter '{KEY_NAME}' (only the "
                    "router sleeps and wakes encoders: a sleep behind its back would break its memory ledger)"
                )
            return [self._residency(str(action), rows=1)]
        ids = pb_utils.get_input_tensor_by_name(request, "INPUT_IDS").as_numpy()
        mask = pb_utils.get_input_tensor_by_name(request, "ATTENTION_MASK").as_numpy()
        outputs = [pb_utils.Tensor(self.output_name, self.engine.forward(ids, mask))]
        if contract.RESIDENCY_OUTPUT.name in request.requested_output_names():
            outputs.append(self._residency("status", rows=len(ids)))
        return outputs

    def _admin_key(self) -> str:
        """Read on first use, not in initialize: a stub that never sees a control request never needs the key."""
        if not hasattr(self, "_key"):
            self._key = server_key()
        return self._key

    def _residency(self, action: str, rows: int) -> Any:
        if not isinstance(self.engine, TorchEncoder):
            raise BadInput("this encoder variant has no residency control (only the PyTorch engine has)")
        if action not in contract.RESIDENCY_ACTIONS:
            raise BadInput(f"residency must be one of {', '.join(contract.RESIDENCY_ACTIONS)}, got '{action}'")
        state = self.engine.sleep() if action == "sleep" else self.engine.wake() if action == "wake" else {}
        text = json.dumps(self.engine.residency() | state).encode()
        return pb_utils.Tensor(contract.RESIDENCY_OUTPUT.name, np.array([[text]] * rows, dtype=np.object_))

    def finalize(self) -> None:
        if isinstance(self.engine, TorchEncoder):
            self.engine.close()
        del self.engine
