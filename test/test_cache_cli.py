"""`rafale cache ls | rm` through the real CLI on real entries: what ls reports (size against `du`),
removal by key prefix and by age, and refusal while another process builds or uses an entry."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from rafale.data import entries
from rafale.data.causal_lm import prepare_causal_lm
from rafale.paths import ASSETS_DIR
from test.conftest import REPO, run_cli

STORIES = ASSETS_DIR / "tinystories" / "tinystories_train_2MiB.txt"


def corpus(path: Path, chars: int, start: int = 0) -> Path:
    path.write_text(STORIES.read_text(encoding="utf-8")[start:start + chars], encoding="utf-8")
    return path


def prepare(home: Path, path: Path, tokenizer: str, seq: int):
    """The entry built by another process (this one would hold it in use), as (path, key)."""
    code = (f"from rafale.data.causal_lm import prepare_causal_lm\n"
            f"d = prepare_causal_lm({str(path)!r}, {tokenizer!r}, {seq})\nprint(d.path, d.meta['key'])")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**os.environ, "RAFALE_HOME": str(home)},
                         capture_output=True, text=True, check=True).stdout.split()
    return Path(out[0]), out[1]


def ls(home: Path) -> list[dict]:
    out = run_cli("cache", "ls", "--json", home=home)
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines()]


def test_ls_reports_pipeline_sources_tokenizer_size_as_du_and_last_use(rafale_home, tmp_path):
    t0 = time.time()
    a, a_key = prepare(rafale_home, corpus(tmp_path / "a.txt", 30_000), "gpt-neox-20b", 64)
    b, _ = prepare(rafale_home, corpus(tmp_path / "b.txt", 9_000), "smollm2", 32)
    listed = {e["name"]: e for e in ls(rafale_home)}
    assert set(listed) == {a.name, b.name}
    ea = listed[a.name]
    assert ea["pipeline"] == "causal_lm" and ea["sources"] == [str(tmp_path / "a.txt")]
    assert ea["tokenizer"].endswith("gpt-neox-20b/tokenizer.json") and ea["key"] == a_key
    assert ea["state"] == "ready" and t0 - 1 <= ea["last_use"] <= time.time()
    for name, e in listed.items():
        du = subprocess.run(["du", "-s", "-B1", e["path"]], capture_output=True, text=True, check=True)
        assert e["bytes"] == int(du.stdout.split()[0]), name
    table = run_cli("cache", "ls", home=rafale_home).stdout
    assert a.name in table and "a.txt" in table and "gpt-neox-20b" in table and "smollm2" in table


def test_rm_by_key_prefix_and_by_age(rafale_home, tmp_path):
    (a, a_key), (b, _), (c, _) = [prepare(rafale_home, corpus(tmp_path / f"{n}.txt", 9_000, start=i * 9_000),
                                          "gpt-neox-20b", 32) for i, n in enumerate("abc")]
    ambiguous = run_cli("cache", "rm", "causal_lm-", home=rafale_home)
    assert ambiguous.returncode == 2 and "names 3 entries" in ambiguous.stderr
    assert "Traceback" not in ambiguous.stderr and len(ambiguous.stderr.strip().splitlines()) == 1
    gone = run_cli("cache", "rm", a_key[:10], home=rafale_home)
    assert gone.returncode == 0 and f"removed {a.name}" in gone.stdout, gone.stderr
    assert not a.exists() and b.exists()
    ten_days_ago = time.time() - 10 * 86400
    os.utime(b, (ten_days_ago, ten_days_ago))
    old = run_cli("cache", "rm", "--older-than", "7d", home=rafale_home)
    assert old.returncode == 0 and f"removed {b.name}" in old.stdout
    assert [e["name"] for e in ls(rafale_home)] == [c.name]
    # A removed entry is simply built again.
    assert not prepare_causal_lm(str(tmp_path / "a.txt"), "gpt-neox-20b", 32).hit
    bad = run_cli("cache", "rm", "--older-than", "a week", home=rafale_home)
    assert bad.returncode == 2 and "expected a number and a unit" in bad.stderr


def _child(code: str, home: Path) -> subprocess.Popen:
    env = {**os.environ, "RAFALE_HOME": str(home), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)


def test_an_entry_in_use_or_being_built_is_refused(rafale_home, tmp_path):
    small = corpus(tmp_path / "small.txt", 9_000)
    entry, key = prepare(rafale_home, small, "gpt-neox-20b", 32)
    # Another process opens the entry, as a training run does, and keeps running.
    user = _child(f"from rafale.data.causal_lm import prepare_causal_lm\n"
                  f"d = prepare_causal_lm({str(small)!r}, 'gpt-neox-20b', 32)\nprint(d.hit, flush=True)\n"
                  f"import time; time.sleep(600)", rafale_home)
    try:
        assert user.stdout.readline().strip() == "True"
        assert [e["state"] for e in ls(rafale_home)] == ["in use"]
        refused = run_cli("cache", "rm", key[:8], home=rafale_home)
        assert refused.returncode == 2 and "is in use by a running process" in refused.stderr
        assert entry.is_dir()
    finally:
        user.send_signal(signal.SIGKILL)  # kill -9 holds nothing afterwards
        user.wait()
    assert run_cli("cache", "rm", key[:8], home=rafale_home).returncode == 0
    assert not entry.exists()

    # A real build of a larger corpus, caught while it runs.
    big = tmp_path / "big.txt"
    big.write_text(STORIES.read_text(encoding="utf-8") * 3, encoding="utf-8")
    builder = _child(f"from rafale.data.causal_lm import prepare_causal_lm\n"
                     f"print(prepare_causal_lm({str(big)!r}, 'gpt-neox-20b', 64).path, flush=True)", rafale_home)
    building = []
    deadline = time.time() + 120
    while not building and time.time() < deadline and builder.poll() is None:
        building = [e for e in entries.list_entries() if e.state == "building"]
        time.sleep(0.005)
    assert building, "the build ended before it was seen"
    assert "being built" in entries.remove(building[0])
    built = Path(builder.stdout.readline().strip())
    assert builder.wait() == 0 and built.name == building[0].name
    assert [e.state for e in entries.list_entries()] == ["ready"]
