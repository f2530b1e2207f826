"""`rafale chat` under a pseudo-terminal (pty.fork: the REPL's terminal is a real tty, and Ctrl-C is the
terminal's interrupt character) on tiny llama GGUFs with a chat template: each answer printed equals the
greedy tokens of the rendered conversation decoded by `tokenizers`; /reset and /system change what is
rendered; an outgrown history is truncated with a notice; Ctrl-C stops an answer and the REPL goes on."""

import os
import pty
import select
import sys
import time
from pathlib import Path

import pytest

from test.conftest import REPO
from test.test_finetune import TEMPLATE
from test.test_gguf import tiny_gguf


class Terminal:
    def __init__(self, *args: str, home: Path):
        env = {**os.environ, "RAFALE_HOME": str(home), "PYTHONUNBUFFERED": "1",
               "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: its controlling terminal is the pty
            os.chdir(REPO)
            os.execve(sys.executable, [sys.executable, "-m", "rafale", "chat", *args], env)
        self.buf = b""

    def read_until(self, marker: str, timeout: float = 180) -> str:
        end = time.time() + timeout
        while marker.encode() not in self.buf and time.time() < end:
            if select.select([self.fd], [], [], 0.2)[0]:
                try:
                    self.buf += os.read(self.fd, 1 << 16)
                except OSError:
                    break
                self.buf = self.buf.replace(b"\r\n", b"\n")  # the terminal's line ends
        head, found, rest = self.buf.partition(marker.encode())
        assert found, f"no {marker!r} in {self.buf[-500:]!r}"
        self.buf = rest
        return head.decode("utf-8", errors="replace")

    def send(self, text: str) -> None:
        os.write(self.fd, text.encode())

    def exit_code(self) -> int:
        _, status = os.waitpid(self.pid, 0)
        return os.waitstatus_to_exitcode(status)


def _expected(path: Path, messages: list[dict], max_new_tokens: int) -> str:
    """The greedy answer to `messages`: rendered, decoded with the KV cache, the end token left out,
    decoded in one go by the tokenizer."""
    from rafale.chat_repl import stream_tokens
    from rafale.data.chat import load_chat_template
    from rafale.inference import load_gguf
    from rafale.sampling import GREEDY

    model, tok, eos, folder = load_gguf(str(path))
    text = load_chat_template(folder).render(messages, add_generation_prompt=True)
    ids = list(stream_tokens(model, tok.encode(text, add_special_tokens=False).ids, max_new_tokens, eos, GREEDY, 0))
    # DecodeStream never prints an incomplete character at the very end of an answer; decode() shows it
    # as U+FFFD (a random model's bytes need not form characters).
    return tok.decode([i for i in ids if i not in eos], skip_special_tokens=True).rstrip("\ufffd")


def test_streamed_pieces_join_to_the_text_and_never_split_a_character():
    from tokenizers import Tokenizer

    from rafale.chat_repl import text_pieces

    tok = Tokenizer.from_file(str(REPO / "rafale/assets/tokenizers/smollm2/tokenizer.json"))
    text = "Café déjà vu, Ångström. 日本語のテキスト 🤗🚀👍🏽 “quotes” …"
    ids = tok.encode(text, add_special_tokens=False).ids
    assert len(ids) > len(text.split())  # characters spread over several byte-level tokens
    pieces = list(text_pieces(tok, iter(ids)))
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    meta = {"tokenizer.chat_template": TEMPLATE, "tokenizer.ggml.add_bos_token": False}
    short = tiny_gguf(root / "short.gguf", scale=0.1, extra_meta=meta)  # a 64-token context
    long = tiny_gguf(root / "long.gguf", scale=0.1, extra_meta={**meta, "llama.context_length": 4096})
    return short, long


def test_answers_reset_system_and_truncation(models, tmp_path, monkeypatch):
    monkeypatch.setenv("RAFALE_HOME", str(tmp_path))
    short, _ = models
    term = Terminal("--gguf", str(short), "--max-new-tokens", "8", home=tmp_path)
    term.read_until("you> ")
    hi = [{"role": "user", "content": "hi"}]
    term.send("hi\n")
    term.read_until("bot> ")
    first = term.read_until("\nyou> ")
    assert first == _expected(short, hi, 8)
    term.send("/reset\n")
    assert "(conversation reset)" in term.read_until("you> ")
    term.send("hi\n")
    term.read_until("bot> ")
    assert term.read_until("\nyou> ") == first  # the same conversation again, so the same greedy answer
    term.send("/system be brief\n")
    assert "(system message set; conversation reset)" in term.read_until("you> ")
    term.send("hi\n")
    term.read_until("bot> ")
    assert term.read_until("\nyou> ") == _expected(short, [{"role": "system", "content": "be brief"}, *hi], 8)
    # 64 positions, 8 kept for the answer: a few more turns outgrow it; the system message stays.
    notices = []
    for n in range(4):
        term.send(f"message number {n}\n")
        notices.append(term.read_until("bot> "))
        term.read_until("\nyou> ")
    assert any("(history truncated: dropped the" in t and "64-token context)" in t for t in notices), notices
    term.send("\x04")  # Ctrl-D leaves
    assert term.exit_code() == 0


def test_ctrl_c_stops_the_answer_not_the_repl(models, tmp_path):
    _, long = models
    term = Terminal("--gguf", str(long), "--max-new-tokens", "3000", home=tmp_path)
    term.read_until("you> ")
    term.send("hello there\n")
    term.read_until("bot> ")
    time.sleep(0.5)
    term.send("\x03")  # the terminal's interrupt character: SIGINT to the REPL
    assert term.read_until("you> ").endswith(" [stopped]\n")
    term.send("/reset\n")
    assert "(conversation reset)" in term.read_until("you> ")
    term.send("/exit\n")
    assert term.exit_code() == 0
