"""Chat templates for SFT: rendering against transformers' apply_chat_template (SmolLM2's ChatML and three
templates of other shapes), loss masks decoded back to the answers, ids against one-shot tokenization,
truncation, templates that cannot be split, template sources, row shapes and their validation errors,
and the bundled dolly-sft slice."""

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from rafale.data.chat import (ChatInfo, ChatTemplate, load_chat_template, row_to_messages,
                              tokenize_conversation)
from rafale.errors import UserError
from rafale.paths import ASSETS_DIR, TOKENIZERS_DIR

SMOL = TOKENIZERS_DIR / "smollm2"
EOS = "<|im_end|>"  # SmolLM2's eos_token, which the other templates write as {{ eos_token }}

# meta-llama/Llama-2-7b-chat-hf's template (tokenizer_config.json): [INST] turns, a <<SYS>> block in the
# first user turn, raise_exception when roles do not alternate.
LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = "
    "messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}"
    "{% endif %}{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + "
    "'\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}")

# HuggingFaceH4/zephyr-7b-beta's template: one statement a line, so trim_blocks decides the newlines.
ZEPHYR = """{% for message in messages %}
{% if message['role'] == 'user' %}
{{ '<|user|>
' + message['content'] + eos_token }}
{% elif message['role'] == 'system' %}
{{ '<|system|>
' + message['content'] + eos_token }}
{% elif message['role'] == 'assistant' %}
{{ '<|assistant|>
'  + message['content'] + eos_token }}
{% endif %}
{% if loop.last and add_generation_prompt %}
{{ '<|assistant|>' }}
{% endif %}
{% endfor %}"""

# Indented blocks (lstrip_blocks), tojson (transformers' unescaped one), continue (loopcontrols),
# strftime_now, a namespace counter, bos_token, {% generation %}, and tools / documents (None when not given).
FEATURES = """{{ bos_token }}
{%- set ns = namespace(n=0) %}
{% for message in messages %}
    {% if message.role == 'system' %}
[SYS] {{ message.content | tojson }} ({{ strftime_now('%Y') }})
        {% continue %}
    {% endif %}
    {% set ns.n = ns.n + 1 %}
<{{ message.role }} #{{ ns.n }}>
    {% if message.role == 'assistant' %}
{% generation %}{{ message.content | trim }}{{ eos_token }}{% endgeneration %}

    {% else %}
{{ message.content }}
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}
<assistant #{{ ns.n + 1 }}>
{% endif %}
{% if tools is not none or documents is not none %}
[tools]
{% endif %}"""

# What carries loss in each template's assistant turn: the content as the template writes it + eos.
TEMPLATES = {
    "smollm2": (None, lambda c: c + EOS),
    "llama2": (LLAMA2, lambda c: " " + c.strip() + " " + EOS),
    "zephyr": (ZEPHYR, lambda c: c + EOS),
    "features": (FEATURES, lambda c: c.strip() + EOS),
}


def conv(*pairs, system=None):
    messages = [{"role": "system", "content": system}] if system else []
    for user, assistant in pairs:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return messages


CONVERSATIONS = {
    "system": conv(("What is 2+2?", "2+2 is 4."), ("And 3+3?", "That is 6, twice 3."),
                   system="You answer arithmetic in one sentence."),
    "no-system": conv(("Name a colour.", "Blue."), ("Another?", "Green, like grass."),
                      ("One more.", "Red.")),
    "characters": conv(("<b>é & 'q' \"dq\"</b> 😀 {{ not jinja }}", "Ünïcode → ok, <i>&</i>.\n  "),
                       system="Réponds <b>bref</b> & 'net' 😀"),
}
# An answer that opens with spaces (Llama-2 strips them, ChatML keeps them): rendering only, see
# test_a_boundary_inside_a_token for its mask.
PADDED = conv(("Indent this.", "  indented\n"))


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_file(str(SMOL / "tokenizer.json"))


@pytest.fixture(scope="module")
def hf():
    from transformers import PreTrainedTokenizerFast
    config = json.loads((SMOL / "tokenizer_config.json").read_text())
    return PreTrainedTokenizerFast(tokenizer_file=str(SMOL / "tokenizer.json"),
                                   chat_template=(SMOL / "chat_template.jinja").read_text(),
                                   **{k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")})


def template(name: str) -> ChatTemplate:
    return load_chat_template(SMOL, TEMPLATES[name][0])


def loss_pieces(ids, mask, tok) -> list[str]:
    """The loss-bearing ids decoded, one string per run of consecutive loss-bearing tokens."""
    runs, run = [], []
    for i, m in zip(ids, mask):
        if m:
            run.append(i)
        elif run:
            runs.append(run)
            run = []
    return [tok.decode(r, skip_special_tokens=False) for r in runs + ([run] if run else [])]


@pytest.mark.parametrize("name", TEMPLATES)
def test_rendering_equals_transformers(name, hf):
    t = template(name)
    for messages in [*CONVERSATIONS.values(), PADDED]:
        for upto in (messages, messages[:-1]):
            for generation in (False, True):
                ours = t.render(upto, add_generation_prompt=generation)
                theirs = hf.apply_chat_template(upto, tokenize=False, add_generation_prompt=generation,
                                                chat_template=t.source)
                assert ours == theirs, (name, upto, generation)


@pytest.mark.parametrize("name", TEMPLATES)
@pytest.mark.parametrize("train_on", ["assistant", "last", "all"])
def test_masks_decode_to_the_answers(name, train_on, tok, hf):
    t, loss_text = template(name), TEMPLATES[name][1]
    for messages in CONVERSATIONS.values():
        ids, mask, info = tokenize_conversation(messages, t, tok, train_on, 10_000)
        assert info == ChatInfo()
        # The ids are what apply_chat_template(tokenize=True) gives: the whole text tokenized in one go.
        assert ids == hf.apply_chat_template(messages, tokenize=True, chat_template=t.source)
        answers = [loss_text(m["content"]) for m in messages if m["role"] == "assistant"]
        expected = {"assistant": answers, "last": answers[-1:], "all": [t.render(messages)]}[train_on]
        assert loss_pieces(ids, mask, tok) == expected


def test_pieces_tokenize_like_the_whole(tok):
    """An independent check of the offsets: for ChatML, tokenizing prompt and answer pieces apart and
    joining them gives the same ids, and the answer pieces up to <|im_end|> are the loss."""
    t = template("smollm2")
    messages = CONVERSATIONS["system"]
    ids, mask, _ = tokenize_conversation(messages, t, tok, "assistant", 10_000)
    joined, joined_mask, previous = [], [], ""
    for i in [i for i, m in enumerate(messages) if m["role"] == "assistant"] + [len(messages)]:
        prompt = t.render(messages[:i], add_generation_prompt=i < len(messages))
        pieces = [(prompt[len(previous):], 0)]
        if i < len(messages):
            answer = t.render(messages[:i + 1])[len(prompt):]
            pieces += [(answer[:answer.index(EOS) + len(EOS)], 1), (answer[answer.index(EOS) + len(EOS):], 0)]
            previous = prompt + answer
        for text, loss in pieces:
            piece = tok.encode(text, add_special_tokens=False).ids
            joined += piece
            joined_mask += [loss] * len(piece)
    assert (joined, joined_mask) == (ids, mask)


def test_a_boundary_inside_a_token(tok):
    """'Assistant: ' + 'Hello there.': one-shot tokenization makes ':' 'ĠHello', so the boundary falls inside
    'ĠHello'. The ids stay the one-shot ids; 'ĠHello' starts in the prompt and carries no loss."""
    t = load_chat_template(SMOL, "{% for m in messages %}{% if m.role == 'user' %}User: {{ m.content }}\n"
                                 "{% else %}Assistant: {{ m.content }}{{ eos_token }}\n{% endif %}{% endfor %}"
                                 "{% if add_generation_prompt %}Assistant: {% endif %}")
    messages = conv(("Hi", "Hello there."), ("Bye", "See you."))
    # GPT-NeoX's post-processor trims spaces off its offsets (trim_offsets), which must not hide the merge.
    neox = Tokenizer.from_file(str(TOKENIZERS_DIR / "gpt-neox-20b" / "tokenizer.json"))
    for tokenizer, eos in ((tok, EOS), (neox, "<|endoftext|>")):
        t = ChatTemplate(t.source, {"eos_token": eos})
        ids, mask, info = tokenize_conversation(messages, t, tokenizer, "assistant", 10_000)
        assert ids == tokenizer.encode(t.render(messages), add_special_tokens=False).ids
        assert info.merged_boundaries == 2
        assert loss_pieces(ids, mask, tokenizer) == [" there." + eos, " you." + eos]
    # The same in ChatML when an answer opens with spaces: "\n" + " " is one token, then " indented".
    ids, mask, info = tokenize_conversation(PADDED, template("smollm2"), tok, "assistant", 10_000)
    assert ids == tok.encode(template("smollm2").render(PADDED), add_special_tokens=False).ids
    assert info.merged_boundaries == 1 and loss_pieces(ids, mask, tok) == [" indented\n" + EOS]


def test_truncation(tok):
    t = template("smollm2")
    messages = conv(("First question, rather long " * 4, "First answer, also long " * 4),
                    ("Second question?", "Second answer."), ("Third question?", "The third answer is here."),
                    system="Be brief.")

    def encode(msgs, generation=False):
        return tok.encode(t.render(msgs, add_generation_prompt=generation), add_special_tokens=False).ids

    whole, without_first, last_only = encode(messages), encode(messages[:1] + messages[3:]), \
        encode(messages[:1] + messages[5:])
    assert len(whole) > len(without_first) > len(last_only)
    # Fits after dropping the first exchange: the system message stays.
    for train_on in ("assistant", "last"):
        ids, mask, info = tokenize_conversation(messages, t, tok, train_on, len(without_first))
        assert ids == without_first and info == ChatInfo(dropped_messages=2)
        assert loss_pieces(ids, mask, tok)[-1] == "The third answer is here." + EOS
    ids, _, info = tokenize_conversation(messages, t, tok, "assistant", len(whole) - 1)
    assert ids == without_first and info.truncated
    # Only the last exchange left and still too long: its tail is cut (the answer loses its end).
    ids, mask, info = tokenize_conversation(messages, t, tok, "assistant", len(last_only) - 3)
    assert ids == last_only[:-3]
    assert info == ChatInfo(dropped_messages=4, cut_tokens=3)
    assert loss_pieces(ids, mask, tok) == ["The third answer is here"]
    # Not even the prompt fits: nothing to learn, the conversation is dropped.
    prompt = encode(messages[:1] + messages[5:6], generation=True)
    ids, mask, info = tokenize_conversation(messages, t, tok, "assistant", len(prompt))
    cut = len(last_only) - len(prompt)
    assert (ids, mask, info) == ([], [], ChatInfo(dropped_messages=4, cut_tokens=cut, dropped=True))
    ids, mask, info = tokenize_conversation(messages, t, tok, "assistant", len(prompt) + 1)
    assert sum(mask) == 1 and not info.dropped
    # A greeting before the first user message is an exchange of its own.
    greeted = messages[:1] + [{"role": "assistant", "content": "Hello, ask away."}] + messages[5:]
    ids, _, info = tokenize_conversation(greeted, t, tok, "assistant", len(last_only))
    assert ids == last_only and info == ChatInfo(dropped_messages=1)
    # train_on=all keeps learning from what is left.
    ids, mask, info = tokenize_conversation(messages, t, tok, "all", len(prompt))
    assert ids == last_only[:len(prompt)] and all(mask) and info == ChatInfo(dropped_messages=4, cut_tokens=cut)


def test_templates_that_cannot_be_split(tok):
    # The generation prompt ends in a space that the assistant turn does not have.
    spaced = load_chat_template(SMOL, "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
                                      "{% if add_generation_prompt %}<assistant> {% endif %}")
    with pytest.raises(UserError, match=r"^row 3: this chat template cannot be split into prompt and answer "
                                        r"\(rendering messages 0 to 1 does not extend .*data\.chat_template"):
        tokenize_conversation(CONVERSATIONS["no-system"], spaced, tok, "assistant", 10_000, where="row 3")
    # Earlier answers are hidden once the conversation goes on (as reasoning templates hide thoughts):
    # only the last answer can be split, and train_on=all needs no split.
    hiding = load_chat_template(SMOL, "{% for m in messages %}{% if m.role == 'assistant' %}<bot>{% if loop.last %}"
                                      "{{ m.content }}{% else %}...{% endif %}</bot>{% else %}<user>{{ m.content }}"
                                      "</user>{% endif %}{% endfor %}{% if add_generation_prompt %}<bot>{% endif %}")
    messages = CONVERSATIONS["no-system"]
    with pytest.raises(UserError, match=r"the messages before message 3 with the generation prompt"):
        tokenize_conversation(messages, hiding, tok, "assistant", 10_000)
    ids, mask, _ = tokenize_conversation(messages, hiding, tok, "last", 10_000)
    assert loss_pieces(ids, mask, tok) == ["Red.</bot>"]
    assert sum(tokenize_conversation(messages, hiding, tok, "all", 10_000)[1]) == len(ids)


def test_template_errors_are_user_errors(tok):
    llama2 = template("llama2")
    twice = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
             {"role": "assistant", "content": "c"}]
    with pytest.raises(UserError, match=r"^row 9: .*refused this conversation: Conversation roles must "
                                        r"alternate user/assistant"):
        tokenize_conversation(twice, llama2, tok, "assistant", 100, where="row 9")
    with pytest.raises(UserError, match=r"^data\.chat_template: .* is not a valid Jinja template \(line 1"):
        load_chat_template(SMOL, "{% for m in messages %}{{ m.content }}")


def test_template_sources(tmp_path):
    smol = load_chat_template(SMOL / "tokenizer.json")
    assert smol.source == (SMOL / "chat_template.jinja").read_text()
    assert smol.special_tokens == {"bos_token": "<|im_start|>", "eos_token": EOS, "unk_token": "<|endoftext|>",
                                   "pad_token": EOS}
    # tokenizer_config.json's chat_template, with tokens written as AddedToken objects; a named list
    # uses its "default"; chat_template.jinja next to it wins, as in transformers.
    config = {"bos_token": {"__type": "AddedToken", "content": "<s>"}, "eos_token": "</s>", "pad_token": None,
              "additional_special_tokens": [], "chat_template": "{{ bos_token }}{{ messages[0].content }}"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    t = load_chat_template(tmp_path)
    assert t.special_tokens == {"bos_token": "<s>", "eos_token": "</s>"}
    assert t.render([{"role": "user", "content": "x"}]) == "<s>x"
    config["chat_template"] = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D{{ eos_token }}"}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    assert load_chat_template(tmp_path).render([]) == "D</s>"
    config["chat_template"] = config["chat_template"][:1]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="templates named tool_use and none is 'default'"):
        load_chat_template(tmp_path)
    (tmp_path / "chat_template.jinja").write_text("J{{ bos_token }}")
    assert load_chat_template(tmp_path).render([]) == "J<s>"
    # Overrides: a .jinja file (also relative to the bundled assets) or a literal template.
    (tmp_path / "other.jinja").write_text("O")
    assert load_chat_template(tmp_path, str(tmp_path / "other.jinja")).render([]) == "O"
    assert load_chat_template(tmp_path, "tokenizers/smollm2/chat_template.jinja").source == smol.source
    assert load_chat_template(tmp_path, "L{{ eos_token }}").render([]) == "L</s>"
    with pytest.raises(UserError, match=r"^data\.chat_template: no file or directory 'missing\.jinja'"):
        load_chat_template(tmp_path, "missing.jinja")
    with pytest.raises(UserError, match=r"^data\.chat_template: 'chatml\.txt' is neither a \.jinja file nor"):
        load_chat_template(tmp_path, "chatml.txt")
    # No template anywhere (the bundled gpt-neox-20b has none).
    with pytest.raises(UserError, match=r"^data\.chat_template: the tokenizer in .*gpt-neox-20b has no chat "
                                        r"template .*set data\.chat_template to a \.jinja file"):
        load_chat_template(TOKENIZERS_DIR / "gpt-neox-20b" / "tokenizer.json")


def test_row_shapes():
    messages = CONVERSATIONS["system"]
    assert row_to_messages({"messages": [dict(m, name="x") for m in messages]}, "r") == messages
    # An empty system message stays: with SmolLM2's template it replaces the default one.
    quiet = row_to_messages({"messages": [{"role": "system", "content": ""}, *messages[1:3]]}, "r")
    assert template("smollm2").render(quiet).startswith("<|im_start|>system\n<|im_end|>\n<|im_start|>user")
    alpaca = {"instruction": "Translate.", "input": "Bonjour", "output": "Hello"}
    assert row_to_messages(alpaca, "r") == conv(("Translate.\n\nBonjour", "Hello"))
    assert row_to_messages(dict(alpaca, input=""), "r") == conv(("Translate.", "Hello"))
    assert row_to_messages({"instruction": "Translate.", "output": "Hello"}, "r") == conv(("Translate.", "Hello"))
    # llm-foundry's prompt/response rows (dolly_hhrlhf's first row) are taken verbatim.
    prompt = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
              "request.\n\n### Instruction:\nwhat is kangen water?\n\n### Response:\n")
    assert row_to_messages({"prompt": prompt, "response": "Kangen water is alkaline ionized water."}, "r") == \
        conv((prompt, "Kangen water is alkaline ionized water."))


ANSWER = {"role": "assistant", "content": "ok"}


@pytest.mark.parametrize("row, error", [
    ({"messages": []}, "'messages' must be a non-empty list"),
    ({"messages": "hi"}, "'messages' must be a non-empty list"),
    ({"messages": ["hi", ANSWER]}, "message 0 is not an object with 'role' and 'content'"),
    ({"messages": [{"role": "tool", "content": "42"}, ANSWER]},
     'message 0 has role "tool"; the allowed roles are system, user, assistant'),
    ({"messages": [{"content": "hi"}, ANSWER]}, "message 0 has role null"),
    ({"messages": [{"role": "user", "content": None}, ANSWER]}, r"message 0 \(user\) content must be a non-empty"),
    ({"messages": [{"role": "user", "content": [{"type": "text"}]}, ANSWER]}, r"message 0 \(user\) content"),
    ({"messages": [{"role": "user", "content": "hi"}, dict(ANSWER, content=" \n")]},
     r"message 1 \(assistant\) content must be a non-empty string"),
    ({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}]},
     "the conversation has no assistant message"),
    ({"instruction": "x"}, "'output' must be a non-empty string, got null"),
    ({"instruction": "x", "input": 3, "output": "y"}, "'input' must be a string, got 3"),
    ({"messages": [{"role": "system", "content": " "}, {"role": "user", "content": "hi"}, ANSWER]},
     r"message 0 \(system\) content must be a non-empty string"),
    ({"prompt": "p", "response": ""}, "'response' must be a non-empty string"),
    ({"text": "t"}, "a row needs 'messages', 'instruction' \\+ 'output' .* it has 'text'"),
    ([1, 2], "a row must be a JSON object"),
])
def test_row_errors(row, error):
    with pytest.raises(UserError, match=rf"^train\.jsonl row 7: {error}") as e:
        row_to_messages(row, "train.jsonl row 7")
    assert "\n" not in str(e.value)


def test_bundled_dolly_slice(tok):
    t = template("smollm2")
    lines = (ASSETS_DIR / "dolly-sft" / "messages.jsonl").read_text().splitlines()
    assert len(lines) == 500
    counts = {"whole": 0, "cut": 0, "dropped": 0}
    for n, line in enumerate(lines, 1):
        messages = row_to_messages(json.loads(line), f"messages.jsonl row {n}")
        ids, mask, info = tokenize_conversation(messages, t, tok, "assistant", 512)
        counts["dropped" if info.dropped else "cut" if info.truncated else "whole"] += 1
        assert len(ids) <= 512 and info.dropped_messages == 0
        if not info.truncated:
            assert loss_pieces(ids, mask, tok) == [messages[1]["content"] + EOS]
    # PROVENANCE.md: 41 conversations are longer than 512 tokens, 21 of them in the instruction alone.
    assert counts == {"whole": 459, "cut": 20, "dropped": 21}
