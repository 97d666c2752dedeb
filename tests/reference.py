"""Reference implementations: the Qwen3 model cards' recipes with transformers, written independently of our code
(prompts and pooling copied from the cards, not imported from triton_rag) so that a mistake in ours shows up."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

ENDOFTEXT = 151643  # <|endoftext|>, which the Qwen3-Embedding tokenizer appends


def last_token_pool(last_hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Qwen3-Embedding model card."""
    left_padding = attention_mask[:, -1].sum() == attention_mask.shape[0]
    if left_padding:
        return last_hidden_states[:, -1]
    sequence_lengths = attention_mask.sum(dim=1) - 1
    batch_size = last_hidden_states.shape[0]
    return last_hidden_states[torch.arange(batch_size, device=last_hidden_states.device), sequence_lengths]


def get_detailed_instruct(task_description: str, query: str) -> str:
    return f"Instruct: {task_description}\nQuery:{query}"


def qwen3_embed(model_dir: Path, texts: list[str], dim: int, instruction: str | None = None) -> torch.Tensor:
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), padding_side="left")
    model = AutoModel.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    inputs = [get_detailed_instruct(instruction, t) if instruction else t for t in texts]
    ids = [row + [ENDOFTEXT] for row in tokenizer(inputs, add_special_tokens=True)["input_ids"]]
    batch = tokenizer.pad({"input_ids": ids}, padding=True, return_tensors="pt")
    with torch.no_grad():
        outputs = model(**batch)
    embeddings = last_token_pool(outputs.last_hidden_state, batch["attention_mask"])[:, :dim]
    return F.normalize(embeddings, p=2, dim=1)


RERANK_PREFIX = (
    "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the Instruct "
    'provided. Note that the answer can only be "yes" or "no".<|im_end|>\n<|im_start|>user\n'
)
RERANK_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
DEFAULT_TASK = "Given a web search query, retrieve relevant passages that answer the query"


def qwen3_rerank(model_dir: Path, pairs: list[tuple[str, str]], instruction: str | None = None) -> torch.Tensor:
    """Qwen3-Reranker model card: P(yes) from log_softmax over the [no, yes] logits at the last position."""
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    token_false_id = tokenizer.convert_tokens_to_ids("no")
    token_true_id = tokenizer.convert_tokens_to_ids("yes")
    max_length = 8192
    prefix_tokens = tokenizer.encode(RERANK_PREFIX, add_special_tokens=False)
    suffix_tokens = tokenizer.encode(RERANK_SUFFIX, add_special_tokens=False)
    task = instruction or DEFAULT_TASK
    texts = [f"<Instruct>: {task}\n<Query>: {q}\n<Document>: {d}" for q, d in pairs]
    inputs = tokenizer(
        texts,
        padding=False,
        truncation="longest_first",
        return_attention_mask=False,
        max_length=max_length - len(prefix_tokens) - len(suffix_tokens),
    )
    for i, ele in enumerate(inputs["input_ids"]):
        inputs["input_ids"][i] = prefix_tokens + ele + suffix_tokens
    inputs = tokenizer.pad(inputs, padding=True, return_tensors="pt", max_length=max_length)
    with torch.no_grad():
        batch_scores = model(**inputs).logits[:, -1, :]
    true_vector = batch_scores[:, token_true_id]
    false_vector = batch_scores[:, token_false_id]
    batch_scores = torch.stack([false_vector, true_vector], dim=1)
    batch_scores = torch.nn.functional.log_softmax(batch_scores, dim=1)
    return batch_scores[:, 1].exp()
