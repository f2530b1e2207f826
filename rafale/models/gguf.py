"""GGUF files (llama.cpp's format, https://github.com/ggml-org/ggml/blob/master/docs/gguf.md) read as
an HF checkpoint of the same model: the config.json values, the HF-named tensors (dequantized to
float32 one at a time, on request) and a `tokenizers` tokenizer.json built from the metadata.

    read_gguf(path) -> GGUFModel
        .config                         config.json as a dict (the values transformers derives from the file)
        .tensor_names() / .tensor_shape(name) / .get_tensor(name)      HF names, shapes, float32 tensors
        .tokenizer_json, .chat_template, .bos_token, .eos_token, .pad_token, .unk_token
        .architecture, .quantization    for messages

The metadata and tensor index come from gguf_header.py, a fast read of the header alone (config show
and the tokenizer need no more); `get_tensor` slices each tensor's bytes from the file memory-mapped at
the header's offsets and dequantizes one tensor at a time with gguf.quants.dequantize, so reading a
whole model holds the model plus one tensor. llama.cpp's converter permutes the rows of q
and k within each head (its rotary embedding rotates adjacent pairs of dimensions, HF's the two halves
of a head); `_unpermute` puts them back exactly as transformers' GGUF loader does.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

from typing import TYPE_CHECKING

import numpy as np

from rafale.models.family import ModelError, template
from rafale.models.gguf_header import GGUFHeader, HeaderError, read_header

try:  # the optional extra rafale[gguf]; the callers add the config key to the message
    import gguf
    from gguf.quants import dequantize
except ImportError:
    raise ModelError("reading a .gguf file needs the gguf package: pip install 'rafale[gguf]'") from None

if TYPE_CHECKING:  # the metadata reads without torch (rafale config show); get_tensor makes tensors
    import torch

MAGIC = b"GGUF"

# GGUF tensor name -> HF name ({} = layer index). gguf's TensorNameMap goes from HF to GGUF only, and
# knows many HF spellings per tensor, so its inverse is not unique: hence this table.
LLAMA_TENSORS: dict[str, str] = {
    "token_embd.weight": "model.embed_tokens.weight",
    "blk.{}.attn_norm.weight": "model.layers.{}.input_layernorm.weight",
    "blk.{}.attn_q.weight": "model.layers.{}.self_attn.q_proj.weight",
    "blk.{}.attn_k.weight": "model.layers.{}.self_attn.k_proj.weight",
    "blk.{}.attn_v.weight": "model.layers.{}.self_attn.v_proj.weight",
    "blk.{}.attn_output.weight": "model.layers.{}.self_attn.o_proj.weight",
    "blk.{}.ffn_norm.weight": "model.layers.{}.post_attention_layernorm.weight",
    "blk.{}.ffn_gate.weight": "model.layers.{}.mlp.gate_proj.weight",
    "blk.{}.ffn_up.weight": "model.layers.{}.mlp.up_proj.weight",
    "blk.{}.ffn_down.weight": "model.layers.{}.mlp.down_proj.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",  # absent when the head is the embedding (tied)
}

# `{arch}.` metadata key -> config.json key, and the keys llama.cpp refuses to load a llama model
# without (the others have defaults, see `_config`).
LLAMA_CONFIG: dict[str, str] = {
    "block_count": "num_hidden_layers",
    "embedding_length": "hidden_size",
    "feed_forward_length": "intermediate_size",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "context_length": "max_position_embeddings",
    "rope.freq_base": "rope_theta",
    "rope.dimension_count": "head_dim",
    "vocab_size": "vocab_size",
}
LLAMA_REQUIRED = ("block_count", "embedding_length", "feed_forward_length", "attention.head_count",
                  "attention.layer_norm_rms_epsilon", "context_length")

# general.architecture -> HF class, tensor names, config keys, required keys, and the config.json
# values the architecture fixes (LlamaConfig's defaults, which llama.cpp's llama graph also assumes).
ARCHITECTURES: dict[str, dict] = {
    "llama": dict(hf_class="LlamaForCausalLM", tensors=LLAMA_TENSORS, config=LLAMA_CONFIG,
                  required=LLAMA_REQUIRED,
                  fixed=dict(hidden_act="silu", attention_bias=False, mlp_bias=False)),
}
ROPE_THETA_DEFAULT = 10000.0  # llama.cpp's and LlamaConfig's default when rope.freq_base is absent

# Special token -> the metadata key holding its id.
SPECIAL_IDS = {"bos_token": "tokenizer.ggml.bos_token_id", "eos_token": "tokenizer.ggml.eos_token_id",
               "pad_token": "tokenizer.ggml.padding_token_id", "unk_token": "tokenizer.ggml.unknown_token_id"}
CONTROL, USER_DEFINED = 3, 4  # llama.cpp token types (tokenizer.ggml.token_type) that are added tokens

# Llama 3's split regex as its tokenizer.json writes it; llama.cpp spells (?i:...) out letter by letter.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
# tokenizer.ggml.pre -> how llama.cpp splits text before BPE, as a `tokenizers` pre-tokenizer; whether a
# word that is itself a token skips the merges (ignore_merges); llama.cpp's add_bos when the file has no
# tokenizer.ggml.add_bos_token. From llama.cpp's src/llama-vocab.cpp (llama_vocab::impl::load and
# llm_tokenizer_bpe): https://github.com/ggml-org/llama.cpp/blob/master/src/llama-vocab.cpp
_GPT2 = dict(pre_tokenizer=_BYTE_LEVEL, ignore_merges=False, add_bos=False)
# "\p{N}" first (each digit its own piece), then GPT-2's regex: what SmolLM's own tokenizer.json says.
_STARCODER = dict(_GPT2, pre_tokenizer={"type": "Sequence", "pretokenizers": [
    {"type": "Digits", "individual_digits": True}, _BYTE_LEVEL]})
_LLAMA3 = dict(ignore_merges=True, add_bos=True, pre_tokenizer={"type": "Sequence", "pretokenizers": [
    {"type": "Split", "pattern": {"Regex": LLAMA3_SPLIT}, "behavior": "Isolated", "invert": False},
    dict(_BYTE_LEVEL, use_regex=False)]})
PRE_TOKENIZERS: dict[str, dict] = {
    "gpt-2": _GPT2,
    "starcoder": _STARCODER, "refact": _STARCODER, "smollm": _STARCODER,
    "llama3": _LLAMA3, "llama-v3": _LLAMA3, "llama-bpe": _LLAMA3,
}


class GGUFModel:
    """One GGUF file, read as HF names and values (see the module docstring). Build it with `read_gguf`."""

    def __init__(self, path: Path, header: GGUFHeader, arch: dict):
        self.path = path
        meta = header.metadata
        self.architecture: str = meta["general.architecture"]
        self._tensors = {}  # HF name -> TensorInfo (read_gguf has checked that every name maps)
        for t in header.tensors:
            tmpl, layer = template(t.name)
            self._tensors[arch["tensors"][tmpl].format(layer)] = t
        self.quantization: tuple[str, ...] = tuple(sorted({gguf.GGMLQuantizationType(t.type).name
                                                           for t in header.tensors}))
        self._data_offset, self._byte_order = header.data_offset, header.byte_order
        self._file = None  # the file memory-mapped, once get_tensor needs the data
        self.config: dict = _config(meta, arch, has_head="lm_head.weight" in self._tensors)
        self._permuted = {}  # q and k -> the head count llama.cpp permuted their rows by
        for i in range(self.config["num_hidden_layers"]):
            self._permuted[f"model.layers.{i}.self_attn.q_proj.weight"] = self.config["num_attention_heads"]
            self._permuted[f"model.layers.{i}.self_attn.k_proj.weight"] = self.config["num_key_value_heads"]
        self._meta = meta
        _tokenizer_settings(meta, str(path))  # its errors now; the json itself when asked for
        self.chat_template: str | None = meta.get("tokenizer.chat_template")
        tokens = meta["tokenizer.ggml.tokens"]
        special = {name: tokens[meta[key]] if key in meta else None for name, key in SPECIAL_IDS.items()}
        self.bos_token: str | None = special["bos_token"]
        self.eos_token: str | None = special["eos_token"]
        self.pad_token: str | None = special["pad_token"]
        self.unk_token: str | None = special["unk_token"]

    @functools.cached_property
    def tokenizer_json(self) -> str:
        return _tokenizer_json(self._meta, str(self.path))

    def tensor_names(self) -> list[str]:
        """The HF names of the tensors in the file, in file order (no lm_head.weight when tied)."""
        return list(self._tensors)

    def tensor_shape(self, name: str) -> tuple[int, ...]:
        """A tensor's HF (PyTorch) shape, without reading it: GGUF lists dimensions innermost first."""
        return tuple(reversed(self._tensors[name].dims))

    def get_tensor(self, name: str) -> torch.Tensor:
        """The tensor `name` (an HF name), dequantized to a new float32 tensor."""
        import torch

        w = dequantize(*self._stored(name))
        if not w.flags.writeable:  # F32 comes back as a view of the read-only memory map
            w = w.copy()
        out = torch.from_numpy(w).reshape(self.tensor_shape(name))
        assert out.dtype == torch.float32, (name, out.dtype)
        return _unpermute(out, self._permuted[name]) if name in self._permuted else out

    def _stored(self, name: str) -> tuple[np.ndarray, "gguf.GGMLQuantizationType"]:
        """The tensor's bytes as gguf.GGUFReader lays them out (rows of its innermost dimension; the
        quantized blocks of a row as bytes) and its type, for gguf's `dequantize`. Sliced from a memory
        map at the offsets the header gives (already checked against the file's size): GGUFReader would
        first parse every metadata value again, the 49k-token vocabulary included (2.2 s of the 4.8 s
        that reading SmolLM2-135M took). A big-endian file's float tensors are byte-swapped here;
        gguf's dequantizers read little-endian blocks only, so its quantized tensors are refused."""
        info = self._tensors[name]
        qtype = gguf.GGMLQuantizationType(info.type)
        if self._file is None:
            self._file = np.memmap(self.path, dtype=np.uint8, mode="r")
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        inner, *outer = info.dims
        start = self._data_offset + info.offset
        row_bytes = inner // block * type_size
        data = self._file[start:start + row_bytes * math.prod(outer)].reshape(*reversed(outer), row_bytes)
        if self._byte_order == "<":
            return data, qtype
        floats = {gguf.GGMLQuantizationType.F32: "f4", gguf.GGMLQuantizationType.F16: "f2"}
        if qtype not in floats:
            raise ModelError(f"{self.path}: tensor {info.name} is {qtype.name} in a big-endian GGUF file, which "
                             f"cannot be dequantized here; use a little-endian file (what llama.cpp writes)")
        native = data.view(">" + floats[qtype]).astype("<" + floats[qtype])
        return native.view(np.uint8), qtype

    # The TensorSource interface (models/weights.py), so `load_weights` reads a GGUF as a checkpoint.
    keys, shape, get = tensor_names, tensor_shape, get_tensor


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undoes llama.cpp's q/k row permutation (convert_hf_to_gguf.py's LlamaModel.permute): within each
    head, rows were reordered from [first half, second half] to interleaved pairs."""
    rest = w.shape[1:]
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *rest).transpose(1, 2).reshape(w.shape).contiguous()


def _config(meta: dict, arch: dict, has_head: bool) -> dict:
    """config.json of the model, with the values transformers' GGUF loader derives from the same metadata
    (and the defaults LlamaConfig gives the keys a file leaves out)."""
    prefix = meta["general.architecture"] + "."
    cfg = {"architectures": [arch["hf_class"]], "model_type": meta["general.architecture"]}
    cfg.update({hf: meta[prefix + key] for key, hf in arch["config"].items() if prefix + key in meta})
    cfg.setdefault("num_key_value_heads", cfg["num_attention_heads"])
    cfg.setdefault("head_dim", cfg["hidden_size"] // cfg["num_attention_heads"])
    cfg.setdefault("rope_theta", ROPE_THETA_DEFAULT)
    cfg.setdefault("vocab_size", len(meta["tokenizer.ggml.tokens"]))
    cfg["rope_scaling"] = _rope_scaling(meta, prefix)
    cfg["tie_word_embeddings"] = not has_head
    cfg.update(arch["fixed"])
    for name, key in SPECIAL_IDS.items():
        if key in meta and name != "unk_token":  # config.json has no unk id
            cfg[name + "_id"] = meta[key]
    return cfg


def _rope_scaling(meta: dict, prefix: str) -> dict | None:
    """HF's rope_scaling from llama.cpp's rope.scaling.* keys (type linear, yarn, ...), or None."""
    kind = meta.get(prefix + "rope.scaling.type", "none")
    if kind == "none":
        return None
    out = {"rope_type": kind, "factor": meta.get(prefix + "rope.scaling.factor")}
    if prefix + "rope.scaling.original_context_length" in meta:
        out["original_max_position_embeddings"] = meta[prefix + "rope.scaling.original_context_length"]
    return out


def _tokenizer_settings(meta: dict, where: str) -> tuple[dict, dict]:
    """(PRE_TOKENIZERS entry, {"bos"/"eos": id of the token put around every text}) of the file's
    tokenizer, or the ModelError saying why rafale cannot build it."""
    model = meta["tokenizer.ggml.model"]
    if model != "gpt2":
        raise ModelError(f"{where}: its tokenizer is {model!r} (tokenizer.ggml.model); rafale builds "
                        f"tokenizers only for byte-level BPE ('gpt2') GGUF files")
    pre_name = meta.get("tokenizer.ggml.pre")
    if pre_name not in PRE_TOKENIZERS:
        raise ModelError(f"{where}: pre-tokenizer {pre_name!r} (tokenizer.ggml.pre) is not supported; "
                        f"supported: {', '.join(PRE_TOKENIZERS)}")
    pre = PRE_TOKENIZERS[pre_name]
    missing = [k for k in ("tokenizer.ggml.merges", "tokenizer.ggml.token_type") if k not in meta]
    if missing:
        raise ModelError(f"{where}: lacks tokenizer metadata {', '.join(missing)}; re-convert the model "
                        f"with llama.cpp's convert_hf_to_gguf.py")
    # What llama.cpp puts around every encoded text: BOS and/or EOS, when the file (or the
    # pre-tokenizer's default) says so.
    around = {"bos": meta.get("tokenizer.ggml.add_bos_token", pre["add_bos"]),
              "eos": meta.get("tokenizer.ggml.add_eos_token", False)}
    specials = {}  # "bos"/"eos" -> token id
    for side, wanted in around.items():
        key = f"tokenizer.ggml.{side}_token_id"
        if wanted and key not in meta:
            raise ModelError(f"{where}: tokenizer.ggml.add_{side}_token is set but {key} is missing")
        if wanted:
            specials[side] = meta[key]
    return pre, specials


def _tokenizer_json(meta: dict, where: str) -> str:
    """A tokenizer.json (byte-level BPE) that splits, merges and adds special tokens as llama.cpp does
    with this file's tokenizer.ggml.* metadata."""
    pre, specials = _tokenizer_settings(meta, where)
    tokens = meta["tokenizer.ggml.tokens"]
    added = [{"id": i, "content": tokens[i], "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": kind == CONTROL}
             for i, kind in enumerate(meta["tokenizer.ggml.token_type"]) if kind in (CONTROL, USER_DEFINED)]

    def sequence(seq: str, type_id: int) -> list[dict]:
        """One sequence of the post-processor's template, with the special tokens around it."""
        out = [{"Sequence": {"id": seq, "type_id": type_id}}]
        if "bos" in specials:
            out.insert(0, {"SpecialToken": {"id": tokens[specials["bos"]], "type_id": type_id}})
        if "eos" in specials:
            out.append({"SpecialToken": {"id": tokens[specials["eos"]], "type_id": type_id}})
        return out

    tokenizer = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        "pre_tokenizer": pre["pre_tokenizer"],
        "post_processor": {"type": "TemplateProcessing", "single": sequence("A", 0),
                           "pair": sequence("A", 0) + sequence("B", 1),
                           "special_tokens": {tokens[i]: {"id": tokens[i], "ids": [i], "tokens": [tokens[i]]}
                                              for i in specials.values()}},
        "decoder": _BYTE_LEVEL,
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": pre["ignore_merges"],
                  "vocab": {t: i for i, t in enumerate(tokens)},
                  # GGUF writes a merge as "left right"; byte-level tokens never hold a space.
                  "merges": [m.split(" ", 1) for m in meta["tokenizer.ggml.merges"]]},
    }
    return json.dumps(tokenizer, ensure_ascii=False)


def _corrupt(path: Path, e: Exception) -> ModelError:
    return ModelError(f"{path} is not a readable GGUF file, likely truncated or corrupt ({e}); re-download it")


@functools.lru_cache(maxsize=4)
def _cached_header(path: str, size: int, mtime_ns: int) -> GGUFHeader:
    """read_header, once per version of a file: config show and training read a GGUF's metadata for
    the tokenizer and again for the model config."""
    header = read_header(path)
    names = set()
    for t in header.tensors:  # what GGUFReader refuses in the tensor index, refused here already
        if t.name in names:
            raise HeaderError(f"tensor {t.name!r} appears twice")
        names.add(t.name)
        try:
            block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(t.type)]
        except ValueError:
            raise HeaderError(f"tensor {t.name!r} has unknown type {t.type}") from None
        end = header.data_offset + t.offset + math.prod(t.dims) * type_size // block
        if end > header.file_size:
            raise HeaderError(f"the file ends at byte {header.file_size}, inside the data of tensor "
                              f"{t.name!r} (to byte {end})")
    return header


def _read_header(path: Path) -> GGUFHeader:
    """The header of the GGUF file at `path` (gguf_header.read_header, memoized while the file is
    unchanged) with its tensor index checked against the file's size."""
    st = path.stat()
    return _cached_header(str(path.resolve()), st.st_size, st.st_mtime_ns)


def read_gguf(path: str | Path) -> GGUFModel:
    """Reads the metadata and tensor index of a GGUF file (the tensors stay on disk until
    `get_tensor`), or raises a one-line ModelError naming the file and what is wrong with it."""
    path = Path(path).expanduser()
    here = str(path)
    if not path.is_file():
        raise ModelError(f"{here} does not exist or is not a file")
    with path.open("rb") as f:
        head = f.read(len(MAGIC))
    if head != MAGIC:
        raise ModelError(f"{here} is not a GGUF file (it does not start with {MAGIC!r}); point it at a .gguf file")
    try:
        header = _read_header(path)
    except (HeaderError, OSError) as e:
        raise _corrupt(path, e) from None
    meta = header.metadata
    name = meta.get("general.architecture")
    if name not in ARCHITECTURES:
        supported = ", ".join(f"{a} ({s['hf_class']})" for a, s in ARCHITECTURES.items())
        raise ModelError(f"{here} holds a {name!r} model (general.architecture); supported GGUF "
                        f"architectures: {supported}")
    arch = ARCHITECTURES[name]
    missing = [f"{name}.{k}" for k in arch["required"] if f"{name}.{k}" not in meta]
    missing += [k for k in ("tokenizer.ggml.model", "tokenizer.ggml.tokens") if k not in meta]
    if missing:
        raise ModelError(f"{here} lacks required metadata {', '.join(missing)}; re-convert the model with "
                        f"llama.cpp's convert_hf_to_gguf.py")
    unknown = [t.name for t in header.tensors if template(t.name)[0] not in arch["tensors"]]
    if unknown:
        # rope_freqs.weight is how llama.cpp stores Llama 3.1-style rope scaling: the frequency
        # factors themselves, from which HF's rope_scaling settings cannot be read back.
        raise ModelError(f"{here} has tensors with no {arch['hf_class']} counterpart: {', '.join(unknown[:8])}"
                        f"{' and more' if len(unknown) > 8 else ''}; convert from the HF checkpoint instead")
    # One block of each tensor type (zeros; the data stays unread): gguf raises NotImplementedError for
    # types it cannot dequantize, and this says so now rather than halfway through loading.
    first = {}
    for t in header.tensors:
        first.setdefault(gguf.GGMLQuantizationType(t.type), t)
    for qtype, t in first.items():
        try:
            dequantize(np.zeros((1, gguf.GGML_QUANT_SIZES[qtype][1]), np.uint8), qtype)
        except NotImplementedError:
            raise ModelError(f"{here} stores tensors as {qtype.name} (e.g. {t.name}), which the gguf "
                            f"package cannot dequantize; use another quantization of the model") from None
    return GGUFModel(path, header, arch)
