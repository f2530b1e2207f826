"""`rafale runs`: where each run is. Paths come last and whole in an 80-column pipe, names are never cut,
--json prints the records, NAME filters by prefix. The run directories are written as training leaves
them (config.yaml, status.json, metrics.jsonl with a torn last line)."""

import json
import os
import socket

from test.conftest import run_cli


def make_run(home, name: str, status: str, losses: list[float]):
    run_dir = home / "runs" / name
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(f"run: {{name: {name.rsplit('-', 1)[0]}}}\n")
    (run_dir / "status.json").write_text(json.dumps({"status": status, "pid": os.getpid(),
                                                     "host": socket.gethostname()}))
    lines = [json.dumps({"step": i + 1, "loss/train/total": x}) for i, x in enumerate(losses)]
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 9, "loss/tr')  # a write cut short
    return run_dir


def test_paths_and_names_are_whole_in_an_80_column_pipe(tmp_path):
    home = tmp_path / ("a-rather-long-directory-name-for-the-rafale-home" * 2)
    runs = [make_run(home, "pythia-tinyshakespeare-with-a-long-experiment-name-0123abcd", "completed", [9.5, 7.25]),
            make_run(home, "llama-tinystories-4567ef01", "running", [8.0]),
            make_run(home, "llama-tinystories-89ab2345", "failed", [])]
    out = run_cli("runs", home=home, env={"COLUMNS": "80"})
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split() == ["name", "status", "steps", "last", "loss", "path"]
    # One line per run, oldest first, ending with its full path; the name whole at the start.
    assert len(lines) == 4 and all(len(line) > 80 for line in lines[1:])
    for line, run_dir, fields in zip(lines[1:], runs, [("completed", "2", "7.2500"), ("running", "1", "8.0000"),
                                                         ("failed", "-", "-")]):
        assert line.endswith("  " + str(run_dir)) and line.startswith(run_dir.name + " ")
        assert line.split()[1:4] == list(fields)
    assert len({line.index(" /") for line in lines[1:]}) == 1  # the paths start in one column

    listed = run_cli("runs", "--json", home=home)
    assert json.loads(listed.stdout) == [
        {"name": runs[0].name, "status": "completed", "steps": 2, "loss": 7.25, "path": str(runs[0])},
        {"name": runs[1].name, "status": "running", "steps": 1, "loss": 8.0, "path": str(runs[1])},
        {"name": runs[2].name, "status": "failed", "steps": None, "loss": None, "path": str(runs[2])}]

    llama = run_cli("runs", "llama", "--json", home=home)
    assert [r["path"] for r in json.loads(llama.stdout)] == [str(runs[1]), str(runs[2])]
    one = run_cli("runs", "llama-tinystories-89", home=home)
    assert [line.split() for line in one.stdout.splitlines()[1:]] == [lines[3].split()]
    none = run_cli("runs", "bert", home=home)
    assert none.returncode == 0 and none.stdout.strip() == "no run named bert* (`rafale runs` lists them all)"
    assert json.loads(run_cli("runs", "bert", "--json", home=home).stdout) == []
