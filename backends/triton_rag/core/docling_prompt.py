"""The VLM's text side for one page: the chat prompt with the image expanded into its placeholder tokens, the stop
tokens, and generated ids back to DocTags. Plain data in and out, so it is tested without a server."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from triton_rag.core.idefics3 import ImageProcessorConfig, Tiles, image_prompt

#: granite-docling's chat format, used when the checkpoint carries no chat template of its own.
GRANITE_CHAT = (
    "<|start_of_role|>user<|end_of_role|><image>{prompt}<|end_of_text|>\n<|start_of_role|>assistant<|end_of_role|>"
)
#: Where DocTags end (docling stops on these strings too); `<|end_of_text|>`/`<end_of_utterance>` come from the model.
STOP_TOKENS = ("</doctag>", "<|end_of_text|>", "<end_of_utterance>")


def chat_prompt(tokenizer: Any, prompt: str) -> str:
    """The user turn (one image, then the instruction) and the assistant's opening, in the model's chat format."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        return str(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
    return GRANITE_CHAT.format(prompt=prompt)


def stop_token_ids(tokenizer: Any, eos_token_id: int | None) -> tuple[int, ...]:
    """The ids generation stops at: the model's eos and the DocTags end, where the vocabulary has them."""
    ids = {tokenizer.convert_tokens_to_ids(token) for token in STOP_TOKENS}
    if eos_token_id is not None:
        ids.add(eos_token_id)
    unknown, vocab_size = tokenizer.unk_token_id, len(tokenizer)
    return tuple(sorted(i for i in ids if i is not None and i != unknown and 0 <= i < vocab_size))


@dataclass
class PagePrompts:
    """Tokenizes page prompts and decodes generations with one tokenizer (transformers, fast)."""

    tokenizer: Any
    prompt: str
    image_config: ImageProcessorConfig
    eos_token_id: int | None = None

    def __post_init__(self) -> None:
        template = chat_prompt(self.tokenizer, self.prompt)
        if template.count("<image>") != 1:
            raise ValueError(f"the chat prompt must hold exactly one <image>, got {template!r}")
        self.before, self.after = template.split("<image>")
        self.stop_ids = stop_token_ids(self.tokenizer, self.eos_token_id)
        self._by_grid: dict[tuple[int, int], np.ndarray] = {}

    def encode(self, tiles: Tiles) -> np.ndarray:
        """The prompt ids depend on the tile grid alone (a handful of page shapes), so each is tokenized once."""
        grid = (tiles.rows, tiles.cols)
        if grid not in self._by_grid:
            text = self.before + image_prompt(tiles.rows, tiles.cols, self.image_config) + self.after
            ids = np.array(self.tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int64)
            ids.flags.writeable = False
            self._by_grid[grid] = ids
        return self._by_grid[grid]

    def decode(self, ids: list[int]) -> str:
        """DocTags text with special tokens kept (they are the structure), the stop token removed."""
        if ids and ids[-1] in self.stop_ids and self.tokenizer.convert_ids_to_tokens(ids[-1]) != "</doctag>":
            ids = ids[:-1]
        return str(self.tokenizer.decode(ids, skip_special_tokens=False)).lstrip()
