"""Generate tiny random Hugging Face causal-LM checkpoints (llama, mistral, qwen2) for tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

ARCHS = ("llama", "mistral", "qwen2")
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")  # ids 0, 1, 2, 3
UNK_ID, BOS_ID, EOS_ID, PAD_ID = range(4)
DEFAULT_INPUT_IDS = [1, 17, 42, 99, 5, 128, 64, 200, 7, 33, 250, 2]


def _config(arch: str, **kw) -> transformers.PreTrainedConfig:
    if arch == "llama":
        return transformers.LlamaConfig(**kw)
    if arch == "mistral":
        return transformers.MistralConfig(sliding_window=8, **kw)
    if arch == "qwen2":
        # Mixed layer_types: first half full attention, second half sliding.
        n = kw["num_hidden_layers"]
        return transformers.Qwen2Config(
            use_sliding_window=True, sliding_window=8, max_window_layers=n // 2, **kw
        )
    raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHS}")


def _model_class(arch: str) -> type[transformers.PreTrainedModel]:
    return {
        "llama": transformers.LlamaForCausalLM,
        "mistral": transformers.MistralForCausalLM,
        "qwen2": transformers.Qwen2ForCausalLM,
    }[arch]


@torch.no_grad()
def _randomize(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Re-initialise every parameter so that no tensor is constant (ones/zeros)."""
    for name, param in model.named_parameters():  # tied params are listed once
        noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
        if name.endswith("bias"):
            value = 0.02 * noise
        elif "norm" in name:
            value = 1.0 + 0.1 * noise
        else:
            value = 0.02 * noise
        param.copy_(value)


def save_random(path: Path, build, seed: int, vocab_size: int = 256) -> Path:
    """`build()` a transformers model under torch's seed, give every parameter random values (_randomize), and
    save it with a tiny tokenizer of `vocab_size` tokens."""
    torch.manual_seed(seed)
    model = build()
    _randomize(model, torch.Generator().manual_seed(seed))
    model.eval().save_pretrained(path)
    _write_tokenizer(path, vocab_size)
    return path


WORDS = (
    "hello world the a of and to in is it that for on with as was he she they we you i "
    "this be at by not are from or have an but what all were when there can said one"
).split()


def _byte_chars() -> dict[str, str]:
    """GPT-2 byte-level symbols of printable ASCII: itself, except space -> "Ġ", newline -> "Ċ"."""
    mapping = {chr(b): chr(b) for b in range(33, 127)}
    mapping[" "] = "\u0120"
    mapping["\n"] = "\u010a"
    return mapping


def _bpe_vocab_and_merges(vocab_size: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-level BPE over printable ASCII, with merges spelling out common words."""
    if vocab_size < len(SPECIAL_TOKENS) + 27:
        raise ValueError("vocab_size too small for the tiny tokenizer (need >= 31)")
    byte_char = _byte_chars()
    space = byte_char[" "]
    letters = list("abcdefghijklmnopqrstuvwxyz")
    base = [space, *letters] + [c for c in byte_char.values() if c not in letters and c != space]
    tokens = (list(SPECIAL_TOKENS) + base)[:vocab_size]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    merges: list[tuple[str, str]] = []

    def add_merge(left: str, right: str) -> None:
        if len(vocab) < vocab_size and left + right not in vocab:
            merges.append((left, right))
            vocab[left + right] = len(vocab)

    for word in WORDS:  # "hello" and "Ġhello" become single tokens
        for i in range(1, len(word)):
            add_merge(word[:i], word[i])
        add_merge(space, word)
    for left in [space, *letters]:  # filler merges until the vocab is full
        for right in letters:
            add_merge(left, right)
    if len(vocab) != vocab_size:
        raise ValueError(f"cannot build a tiny tokenizer with vocab_size={vocab_size}")
    return vocab, merges


def _write_tokenizer(path: Path, vocab_size: int) -> None:
    # Byte-level BPE (like Llama 3 / Qwen2): AutoTokenizer for qwen2 forces
    # Qwen2Tokenizer, which rebuilds a byte-level BPE from our vocab/merges.
    vocab, merges = _bpe_vocab_and_merges(vocab_size)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        model_max_length=2048,
    )
    fast.save_pretrained(path)


def make_checkpoint(
    path: Path,
    arch: str = "llama",
    *,
    num_layers: int = 4,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    vocab_size: int = 256,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    dtype: torch.dtype = torch.float32,
    sharded: bool = False,
    tie_word_embeddings: bool | None = None,
    seed: int = 0,
    with_tokenizer: bool = True,
    **config_overrides,
) -> Path:
    """Write a tiny random checkpoint (config, safetensors, tokenizer) to `path`; extra keywords go to the config."""
    path = Path(path)
    if tie_word_embeddings is None:
        tie_word_embeddings = arch == "qwen2"
    config = _config(
        arch,
        num_hidden_layers=num_layers,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        vocab_size=vocab_size,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=256,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        **config_overrides,
    )
    torch.manual_seed(seed)
    model = _model_class(arch)(config)
    _randomize(model, torch.Generator().manual_seed(seed))
    model = model.to(dtype).eval()
    model.generation_config.bos_token_id = BOS_ID
    model.generation_config.eos_token_id = EOS_ID
    model.generation_config.pad_token_id = PAD_ID

    # save_pretrained drops lm_head.weight itself when the embeddings are tied.
    total_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    max_shard_size = max(total_bytes // 5, 1) if sharded else "50GB"
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, max_shard_size=max_shard_size)
    if sharded and len(list(path.glob("model-*.safetensors"))) < 3:
        raise RuntimeError("sharded checkpoint has fewer than 3 shards; enlarge the model")
    if with_tokenizer:
        _write_tokenizer(path, vocab_size)
    return path


def _safetensors_files(path: Path) -> list[Path]:
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [path / name for name in sorted(set(weight_map.values()))]
    single = path / "model.safetensors"
    if single.exists():
        return [single]
    return sorted(path.glob("*.safetensors"))


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read every tensor of a (single-file or sharded) safetensors checkpoint."""
    state: dict[str, torch.Tensor] = {}
    for file in _safetensors_files(path):
        state.update({k: v.clone() for k, v in load_file(str(file)).items()})
    return state


@torch.no_grad()
def logits(path: Path, input_ids: list[int] | None = None) -> torch.Tensor:
    """Run a fixed input through the checkpoint at `path` and return its logits."""
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path), dtype="auto", attn_implementation="eager"
    ).eval()
    ids = torch.tensor([input_ids if input_ids is not None else DEFAULT_INPUT_IDS])
    return model(input_ids=ids).logits


def plain_splitmix(key: int, count: int) -> list[int]:
    """SplitMix64 (Steele, Lea and Flood 2014), written plainly in Python integers: words 0..count-1 of `key`."""
    words, mask = [], (1 << 64) - 1
    for i in range(count):
        z = (key + (i + 1) * 0x9E3779B97F4A7C15) & mask
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        words.append(z ^ (z >> 31))
    return words


def plain_uniform(shape, generator: torch.Generator) -> torch.Tensor:
    """composer's random methods' uniform numbers, written plainly: one int64 draw from the generator keys a
    SplitMix64 stream; the low 31 bits of each 32-bit half (low half first) of its words, over 2**31, rounded to
    float32."""
    n = 1
    for size in shape:
        n *= size
    key = int(torch.empty((), dtype=torch.int64).random_(generator=generator))
    halves = [h for w in plain_splitmix(key, (n + 1) // 2) for h in (w & 0xFFFFFFFF, w >> 32)][:n]
    return torch.tensor([(h & 0x7FFFFFFF) / 2**31 for h in halves], dtype=torch.float64).float().reshape(shape)
