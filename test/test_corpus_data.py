"""Corpus formats in the causal_lm and mlm pipelines, the source manifest (launch cost O(files)), and
exact mixtures: token arrays against the tokenizer's own encode of the same text, real files on disk,
real cache entries."""

import gzip
import json
import os
import random
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer

from rafale.config import load_config
from rafale.data import manifest, mixture, sources, tokenize
from rafale.data.causal_lm import prepare_causal_lm
from rafale.data.mlm import prepare_mlm
from rafale.errors import UserError
from rafale.paths import ASSETS_DIR, resolve_tokenizer

STORIES = ASSETS_DIR / "tinystories" / "tinystories_train_2MiB.txt"
EOT = "<|endoftext|>"
# Non-ASCII of several scripts, tabs, inner blank lines and U+2028, which must survive every format.
EXTRA = ["Ça va? «Très bien», dit-elle — naïve café.", "Ελληνικά και русский\n\nδεύτερο", "日本語のテキスト、中文文本。",
         "tab\there\u2028and a line separator", "emoji 👩‍👩‍👧 and e\u0301 combining"]


@pytest.fixture(scope="module")
def neox() -> Tokenizer:
    return Tokenizer.from_file(str(resolve_tokenizer("gpt-neox-20b")))


def documents(n: int = 60) -> list[str]:
    stories = [s.strip() for s in STORIES.read_text(encoding="utf-8").split(EOT)[:n]]
    return [d for pair in zip(stories, EXTRA * n) for d in pair]


def write_formats(folder: Path, docs: list[str]) -> dict[str, Path]:
    """The same documents as .txt (EOT-separated), .jsonl, .jsonl.gz, .parquet, .arrow and save_to_disk."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "c.txt").write_bytes(f"\n{EOT}\n".join(docs).encode("utf-8"))
    lines = "".join(json.dumps({"id": i, "body": d}, ensure_ascii=False) + "\n" for i, d in enumerate(docs))
    (folder / "c.jsonl").write_text(lines, encoding="utf-8")
    (folder / "c.jsonl.gz").write_bytes(gzip.compress(lines.encode("utf-8")))
    table = pa.table({"id": list(range(len(docs))), "body": docs})
    pq.write_table(table, folder / "c.parquet", row_group_size=7)
    with pa.ipc.new_file(str(folder / "c.arrow"), table.schema) as w:
        w.write_table(table, max_chunksize=5)
    datasets.Dataset.from_dict({"body": docs}).save_to_disk(str(folder / "saved"))
    return {"txt": folder / "c.txt", "jsonl": folder / "c.jsonl", "gz": folder / "c.jsonl.gz",
            "parquet": folder / "c.parquet", "arrow": folder / "c.arrow", "saved": folder / "saved"}


# --- every format, the same tokens ------------------------------------------------------------------

def test_same_text_as_txt_jsonl_parquet_gives_byte_identical_token_arrays(rafale_home, tmp_path, neox):
    docs = documents()
    paths = write_formats(tmp_path / "c", docs)
    eos = neox.token_to_id(EOT)
    stream = [i for d in docs for i in neox.encode(d, add_special_tokens=False).ids + [eos]]
    arrays = {}
    for fmt, path in paths.items():
        data = prepare_causal_lm(str(path), "gpt-neox-20b", 64, val_fraction=0.1, doc_separator=EOT,
                                 text_field="body")
        assert data.meta["stats"]["documents"] == len(docs), fmt
        arrays[fmt] = (np.asarray(data.train).tobytes(), np.asarray(data.val).tobytes())
    assert len(set(arrays.values())) == 1, {k: len(v[0]) for k, v in arrays.items()}
    n = len(stream) // 64 * 64
    assert np.frombuffer(arrays["txt"][0] + arrays["txt"][1], np.uint16).tolist() == stream[:n]


def test_mlm_reads_the_formats_alike(rafale_home, tmp_path):
    docs = documents(20)
    paths = write_formats(tmp_path / "c", docs)
    got = {fmt: np.asarray(prepare_mlm(str(paths[fmt]), "bert-base-uncased", 32, val_fraction=0, doc_separator=EOT,
                                       text_field="body").train).tobytes() for fmt in ("txt", "jsonl", "parquet")}
    assert len(set(got.values())) == 1


def test_a_text_file_streamed_in_small_pieces_tokenizes_like_the_whole(rafale_home, tmp_path, neox, monkeypatch):
    # Pieces of 97 characters: separators, blank lines and whitespace-only documents straddle them.
    monkeypatch.setattr(sources, "TXT_PIECE_CHARS", 97)
    text = STORIES.read_text(encoding="utf-8")[:60_000].replace(EOT, f"\n \n{EOT}\n\n  {EOT}   \n")
    path = tmp_path / "big.txt"
    path.write_text(" \n" + text + "\n\t ", encoding="utf-8")
    eos = neox.token_to_id(EOT)
    for separator in (EOT, None):
        whole = tokenize.split_documents(path.read_text(encoding="utf-8"), separator)
        expected = [i for d in whole for i in neox.encode(d, add_special_tokens=False).ids + [eos]]
        got, n_docs = tokenize.tokenize_files([path], neox, eos, separator, np.uint32, "k")
        assert n_docs == len(whole) and got.tolist() == expected, separator


def test_documents_arrive_stripped_and_split_whatever_the_piece_size(tmp_path, monkeypatch):
    rng = random.Random(0)
    alphabet = ["a", "b", " ", "\n", "\t", "<s>", "<", "s", ">"]
    for trial in range(200):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60)))
        path = tmp_path / f"t{trial}.txt"
        path.write_text(text, encoding="utf-8")
        monkeypatch.setattr(sources, "TXT_PIECE_CHARS", rng.randint(1, 8))
        for separator in ("<s>", None):
            docs, current = [], ""
            for fragment, last in tokenize.iter_documents([path], "text", separator, "k"):
                current += fragment
                if last:
                    docs.append(current)
                    current = ""
            assert docs == tokenize.split_documents(text, separator), (text, separator)


def test_bad_rows_exit_with_the_file_and_line_and_leave_no_entry(rafale_home, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": "also fine"}\nnot json\n')
    with pytest.raises(UserError, match=r"data.train: .*bad.jsonl line 3 is not JSON"):
        prepare_causal_lm(str(bad), "gpt-neox-20b", 4)
    with pytest.raises(UserError, match=r"bad.jsonl line 1 has no 'body' field"):
        prepare_causal_lm(str(bad), "gpt-neox-20b", 4, text_field="body")
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1 this is not a parquet file")
    with pytest.raises(UserError, match=r"broken.parquet is not a readable parquet file"):
        prepare_causal_lm(str(broken), "gpt-neox-20b", 4)
    pq.write_table(pa.table({"content": ["x"]}), tmp_path / "other.parquet")
    with pytest.raises(UserError, match=r"other.parquet has no column 'text' \(its columns: content\)"):
        prepare_causal_lm(str(tmp_path / "other.parquet"), "gpt-neox-20b", 4)
    # Nothing half-built is left under an entry's name; the fixed file builds.
    assert not [p for p in (rafale_home / "data").iterdir() if p.is_dir()]
    bad.write_text('{"text": "fine and long enough for a block or two of four tokens"}\n')
    assert not prepare_causal_lm(str(bad), "gpt-neox-20b", 4, val_fraction=0).hit


# --- the manifest: a launch reads no corpus ---------------------------------------------------------

def test_moved_or_touched_identical_files_hit_and_an_edited_one_rebuilds(rafale_home, tmp_path):
    text = STORIES.read_text(encoding="utf-8")[:20_000]
    a = tmp_path / "a" / "corpus.jsonl"
    a.parent.mkdir()
    a.write_text("".join(json.dumps({"text": s}) + "\n" for s in text.split(EOT)))
    first = prepare_causal_lm(str(a), "gpt-neox-20b", 32)
    assert not first.hit
    records = json.loads((rafale_home / "data" / manifest.MANIFEST).read_text())["files"]
    assert records[str(a)][2] == manifest.sha256_file(a)[0]

    moved = tmp_path / "b" / "moved.jsonl"
    moved.parent.mkdir()
    a.rename(moved)
    assert prepare_causal_lm(str(moved), "gpt-neox-20b", 32).path == first.path
    os.utime(moved, ns=(1_000_000_000, 2_000_000_000))  # touched: another mtime, the same bytes
    again = prepare_causal_lm(str(moved), "gpt-neox-20b", 32)
    assert again.hit and again.path == first.path

    with open(moved, "a") as f:
        f.write(json.dumps({"text": "One more story."}) + "\n")
    edited = prepare_causal_lm(str(moved), "gpt-neox-20b", 32)
    assert not edited.hit and edited.path != first.path


def test_an_unchanged_size_and_mtime_is_not_read_again(rafale_home, tmp_path):
    # The proof that a launch does not read the corpus: bytes swapped behind the manifest's back (same
    # size, mtime restored) are not seen; touching the file makes them seen.
    path = tmp_path / "c.txt"
    path.write_text(STORIES.read_text(encoding="utf-8")[:8_000])
    first = prepare_causal_lm(str(path), "gpt-neox-20b", 32)
    st = path.stat()
    path.write_text(path.read_text().replace("Lily", "Lucy"))
    assert path.stat().st_size == st.st_size
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert prepare_causal_lm(str(path), "gpt-neox-20b", 32).path == first.path
    path.touch()
    assert prepare_causal_lm(str(path), "gpt-neox-20b", 32).path != first.path


def test_a_saved_dataset_directory_is_one_source_hashed_by_its_files(rafale_home, tmp_path):
    docs = documents(10)
    saved = write_formats(tmp_path / "c", docs)["saved"]
    first = prepare_causal_lm(str(saved), "gpt-neox-20b", 32, text_field="body")
    assert [s["path"] for s in first.meta["sources"]["train"]] == [str(saved)]
    assert prepare_causal_lm(str(saved), "gpt-neox-20b", 32, text_field="body").hit
    datasets.Dataset.from_dict({"body": docs[::-1]}).save_to_disk(str(tmp_path / "other"))
    assert prepare_causal_lm(str(tmp_path / "other"), "gpt-neox-20b", 32, text_field="body").path != first.path


# --- exact mixtures ---------------------------------------------------------------------------------

def test_largest_remainder_counts_are_exact():
    assert mixture.exact_counts([0.5, 0.3, 0.2], 1000) == [500, 300, 200]
    assert mixture.exact_counts([1, 1, 1], 100) == [34, 33, 33]
    rng = random.Random(1)
    for _ in range(500):
        weights = [rng.uniform(0.01, 5) for _ in range(rng.randint(1, 6))]
        total = rng.randint(0, 10_000)
        counts = mixture.exact_counts(weights, total)
        assert sum(counts) == total
        assert all(abs(c - total * w / sum(weights)) < 1 for c, w in zip(counts, weights))


def write_blocks(path: Path, word: str, n_blocks: int) -> Path:
    """n_blocks documents of exactly 16 NeoX tokens: `word` and 14 x " word", then the EOS."""
    path.write_text("".join(json.dumps({"text": word + f" {word}" * 14}) + "\n" for _ in range(n_blocks)))
    return path


def mix_config(tmp_path: Path, sources_: list[dict], **data) -> object:
    cfg = tmp_path / "mix.yaml"
    cfg.write_text(json.dumps({"model": {"preset": "pythia-micro"},
                               "data": {"train": sources_, "max_seq_len": 16, "val_fraction": 0, **data}}))
    return load_config(str(cfg))


def test_weights_half_three_tenths_one_fifth_over_1000_blocks_give_500_300_200(rafale_home, tmp_path, neox):
    paths = [write_blocks(tmp_path / f"{w}.jsonl", w, n) for w, n in (("the", 100), ("cat", 250), ("dog", 650))]
    cfg = mix_config(tmp_path, [{"path": str(p), "weight": w} for p, w in zip(paths, (0.5, 0.3, 0.2))])
    from rafale.build import pipeline_of

    pipeline = pipeline_of(cfg)
    data = pipeline.prepare()
    assert len(data.train) == 1000
    rows = np.stack([data.train[i] for i in range(len(data.train))])
    assert (data.train[np.array([999, 0, 999])] == rows[[999, 0, 999]]).all()  # as DEBUG=1 indexes it
    first = rows[:, 0].tolist()
    ids = {w: neox.token_to_id(w) for w in ("the", "cat", "dog")}
    assert [first.count(ids[w]) for w in ("the", "cat", "dog")] == [500, 300, 200]
    assert [(m["drawn"], round(m["repeats"], 2)) for m in data.meta["mixture"]] == [(500, 5.0), (300, 1.2), (200, 0.31)]
    # Up-sampled: each block of "the" 5 times; "cat": every block once and 50 of them twice; "dog": 200 distinct.
    picks = {i: np.bincount(data.train.rows[data.train.which == i]) for i in range(3)}
    assert picks[0].tolist() == [5] * 100
    assert np.bincount(picks[1]).tolist() == [0, 200, 50]  # no block drawn 0 times, 200 once, 50 twice
    assert (picks[2] <= 1).all() and picks[2].sum() == 200
    report = pipeline.report(data)
    assert "the.jsonl  weight 0.5  100 blocks -> 500 drawn (50.0%), x5.00" in report
    assert "dog.jsonl  weight 0.2  650 blocks -> 200 drawn (20.0%), x0.31" in report

    # New weights re-tokenize nothing: every source's entry is a hit.
    cfg2 = mix_config(tmp_path, [{"path": str(p), "weight": w} for p, w in zip(paths, (1, 1, 2))])
    again = pipeline_of(cfg2).prepare()
    assert again.hit and [m["drawn"] for m in again.meta["mixture"]] == [250, 250, 500]


def test_mixture_sources_hold_out_their_own_tails_or_read_data_val(rafale_home, tmp_path):
    a, b = write_blocks(tmp_path / "a.jsonl", "the", 40), write_blocks(tmp_path / "b.jsonl", "cat", 60)
    data = mix_config(tmp_path, [{"path": str(a), "weight": 1}, {"path": str(b), "weight": 1}],
                      val_fraction=0.1).data
    from rafale.build import pipeline_of
    from rafale.config import Config

    cfg = Config()
    cfg.data = data
    prepared = pipeline_of(cfg).prepare()
    assert len(prepared.val) == 4 + 6 and len(prepared.train) == 36 + 54
    cfg.data.val = str(write_blocks(tmp_path / "v.jsonl", "dog", 7))
    prepared = pipeline_of(cfg).prepare()
    assert len(prepared.val) == 7 and len(prepared.train) == 100
    # A source too small for its held-out share is named by its place in the mixture.
    cfg.data.val, cfg.data.train = None, [{"path": str(a), "weight": 1},
                                          {"path": str(write_blocks(tmp_path / "one.jsonl", "dog", 1)), "weight": 1}]
    with pytest.raises(UserError, match=r"data.train\[1\] \(.*one.jsonl\): data.train: 1 block\(s\), too few"):
        pipeline_of(cfg).prepare()


@pytest.mark.parametrize("train, message", [
    ([{"path": "a.jsonl", "weight": 0}], r"data.train\[0\].weight: must be > 0"),
    ([{"path": "a.jsonl", "weight": 1}, "b.jsonl"], r"data.train\[1\]: 'b.jsonl' is a plain path in a mixture"),
    ([{"weight": 1}], r"data.train\[0\].path: missing"),
    ([{"path": "a.jsonl", "weight": "heavy"}], r"data.train\[0\].weight: expected a number > 0"),
    ([{"path": "a.jsonl", "weight": 1, "tokenizer": "smollm2"}],
     r"data.train\[0\].tokenizer: 'smollm2' disagrees with data.tokenizer \('gpt-neox-20b'\)"),
    ([{"path": "a.jsonl", "weight": 1, "pipeline": "mlm"}], r"data.train\[0\].pipeline: 'mlm' disagrees"),
    ([{"path": "a.jsonl", "weight": 1, "wieght": 2}], r"data.train\[0\]: unknown key wieght"),
])
def test_bad_mixtures_name_the_key(tmp_path, train, message):
    with pytest.raises(UserError, match=message):
        mix_config(tmp_path, train)


def test_a_pipeline_that_does_not_mix_refuses_a_mixture(tmp_path):
    with pytest.raises(UserError, match=r"data.train: \{path, weight\} sources \(a mixture\) are read by the "
                                        r"causal_lm and mlm pipelines only"):
        mix_config(tmp_path, [{"path": "a.jsonl", "weight": 1}], pipeline="classification",
                   tokenizer="bert-base-uncased")


def test_a_mixture_run_killed_with_sigkill_resumes_bit_for_bit(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    import yaml

    from test.conftest import REPO, run_cli

    steps = 8
    stories = [s.strip() for s in STORIES.read_text(encoding="utf-8").split(EOT)[:120]]
    a = tmp_path / "stories.jsonl"
    a.write_text("".join(json.dumps({"text": s}) + "\n" for s in stories[:80]))
    b = tmp_path / "other.parquet"
    pq.write_table(pa.table({"content": stories[80:]}), b)
    cfg = {"run": {"name": "mix", "seed": 5}, "model": {"preset": "pythia-micro"},
           "data": {"train": [{"path": str(a), "weight": 0.7}, {"path": str(b), "weight": 0.3, "text_field": "content"}],
                    "max_seq_len": 32, "val_fraction": 0},
           "optim": {"lr": 3e-3}, "schedule": {"name": "cosine", "warmup": "2ba"},
           "train": {"max_duration": f"{steps}ba", "global_batch_size": 8, "device_microbatch_size": 8,
                     "save_interval": "2ba"}}
    path = tmp_path / "mix.yaml"
    path.write_text(yaml.safe_dump(cfg))

    def losses(home: Path) -> dict:
        (run_dir,) = (home / "runs").iterdir()
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["loss/train/total"] for r in rows if "loss/train/total" in r}

    ref_home = tmp_path / "ref"
    prepared = run_cli("prepare", "-c", str(path), home=ref_home)
    assert prepared.returncode == 0, prepared.stderr
    assert "mixture of 2 sources" in prepared.stdout and "(70.0%)" in prepared.stdout and "(30.0%)" in prepared.stdout
    ref = run_cli("train", "-c", str(path), home=ref_home)
    assert ref.returncode == 0, ref.stderr
    expected = losses(ref_home)
    assert sorted(expected) == list(range(1, steps + 1))

    home = tmp_path / "killed"
    env = {k: v for k, v in os.environ.items() if k not in ("DATA", "DEBUG", "FORCE")}
    env.update(RAFALE_HOME=str(home), PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "rafale", "train", "-c", str(path)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not any(home.glob("runs/*/checkpoints/latest-rank0.pt")):
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert max(losses(home), default=0) < steps, "the run finished before it could be killed"
    resumed = run_cli("train", "-c", str(path), home=home)
    assert resumed.returncode == 0 and "resuming interrupted run" in resumed.stdout, resumed.stderr
    assert losses(home) == expected


def test_the_bundled_mixture_draws_exactly_its_weights(rafale_home):
    from rafale.build import pipeline_of

    data = pipeline_of(load_config("llama-tinystories-mix")).prepare()
    assert len(data.train) == 2917 and [m["drawn"] for m in data.meta["mixture"]] == [2334, 583]
    assert data.meta["stats"]["documents"] == 2316 + 1000
