"""Chat data for supervised fine-tuning: rows -> conversations -> chat-template text -> token ids + loss mask.

    row ({"messages": [...]}, Alpaca's instruction/input/output, or prompt/response)
      -> messages [{"role": "system"|"user"|"assistant", "content": str}, ...]   (row_to_messages)
      -> text rendered with the model's chat template                            (ChatTemplate.render)
      -> input_ids + loss_mask + ChatInfo                                         (tokenize_conversation)

Rendering reproduces transformers 4.53's `apply_chat_template(messages, tokenize=False)` byte for byte
(its Jinja environment and the variables it passes); transformers is not a dependency of rafale, so the
few lines of environment are rewritten here (transformers/utils/chat_template_utils.py,
`_compile_jinja_template` and `render_jinja_template`). Imports no torch.

Which tokens carry loss is found by rendering, not by parsing the template: for each assistant turn, the
conversation before it rendered with the generation prompt is the prompt, the conversation through it is
prompt + answer, and every rendering must extend the previous one as a string. The answer's loss ends with
its last special token (ChatML's "<|im_end|>", Llama-2's and Zephyr's "</s>"): what the template writes
after it (ChatML's "\\n") carries no loss, because generation stops at that token and the model never
produces the rest. An answer without a special token carries loss to its end.

Truncation (a conversation longer than max_seq_len): leading system messages are kept and whole exchanges
(a user message and the replies up to the next user message) are dropped from the start until it fits;
the exchange holding the last assistant turn is never dropped. If that still does not fit, the tail is
cut at max_seq_len (the final answer loses its end). A conversation left with no loss-bearing token after
its first position (nothing to learn: position 0 is never predicted) is dropped. `ChatInfo` says which
of these happened, for the data preparation to count.
"""

import bisect
import functools
import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from rafale.errors import UserError
from rafale.paths import resolve_data_path

TEMPLATE_KEY = "data.chat_template"
# Tool calls need structured fields (tool_calls, tool_call_id) beyond a string content; not supported.
ROLES = ("system", "user", "assistant")
TRAIN_ON = ("assistant", "all", "last")
# tokenizer_config.json keys that transformers passes to the template (SPECIAL_TOKENS_ATTRIBUTES).
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                      "mask_token", "additional_special_tokens")
# Where transformers finds a tokenizer's template: the file first (it overrides the config's key).
TEMPLATE_FILE = "chat_template.jinja"
CONFIG_FILE = "tokenizer_config.json"
ROW_SHAPES = "'messages', 'instruction' + 'output' (Alpaca, optional 'input'), or 'prompt' + 'response'"


# --- the Jinja environment of transformers 4.53 -----------------------------------------------------

class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` renders its body unchanged, as transformers does when
    not asked for assistant masks; templates written for those masks use the tag and would not parse
    without it. A CallBlock like transformers', so a `set` inside stays local to the block."""
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # transformers replaces Jinja's tojson, which escapes <, >, & and ' for HTML.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format):
    return datetime.now().strftime(format)


@functools.cache
def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())


@dataclass(frozen=True)
class ChatTemplate:
    """A Jinja chat template and the special tokens rendered with it (bos_token, eos_token, ...)."""
    source: str
    special_tokens: dict = field(default_factory=dict)
    origin: str = "the chat template"  # where it came from, for error messages
    compiled: jinja2.Template = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        try:
            compiled = _environment().from_string(self.source)
        except jinja2.TemplateSyntaxError as e:
            raise UserError(f"{TEMPLATE_KEY}: {self.origin} is not a valid Jinja template (line {e.lineno}: "
                            f"{_one_line(e)}); fix the template") from None
        object.__setattr__(self, "compiled", compiled)

    def render(self, messages: list[dict], add_generation_prompt: bool = False,
               where: str = "conversation") -> str:
        """The text `apply_chat_template(messages, tokenize=False, add_generation_prompt=...)` gives."""
        try:
            # transformers passes tools and documents as None when none are given; templates test them.
            return self.compiled.render(messages=messages, tools=None, documents=None,
                                        add_generation_prompt=add_generation_prompt, **self.special_tokens)
        except jinja2.TemplateError as e:
            raise UserError(f"{where}: {self.origin} refused this conversation: {_one_line(e)}; fix the "
                            f"conversation or give another template in {TEMPLATE_KEY}") from None


# --- where a template comes from ----------------------------------------------------------------------

def _token_text(value):
    """A tokenizer_config.json token: a string, or an AddedToken dict {"content": ...} in older files."""
    if isinstance(value, dict):
        return value.get("content")
    if isinstance(value, list):
        return [_token_text(v) for v in value]
    return value


def _pick_named(templates: list, origin: str) -> str:
    """tokenizer_config.json may hold several named templates; transformers uses "default"."""
    named = {t.get("name"): t.get("template") for t in templates if isinstance(t, dict)}
    if "default" not in named:
        raise UserError(f"{TEMPLATE_KEY}: {origin} holds templates named {', '.join(map(str, named))} "
                        f"and none is 'default'; copy the one you want into a .jinja file and set "
                        f"{TEMPLATE_KEY} to it")
    return named["default"]


def load_chat_template(tokenizer_path_or_dir: str | Path, override: str | None = None) -> ChatTemplate:
    """The chat template for a tokenizer: `override` (a `.jinja` file or a literal template) if given, else
    the tokenizer folder's chat_template.jinja, else the `chat_template` of its tokenizer_config.json;
    with the special tokens of that tokenizer_config.json."""
    path = Path(tokenizer_path_or_dir)
    folder = path if path.is_dir() else path.parent
    config_path = folder / CONFIG_FILE
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    # transformers' special_tokens_map: only the tokens that are set (an empty list is not).
    special = {k: v for k in SPECIAL_TOKEN_KEYS if (v := _token_text(config.get(k)))}

    if override is not None:
        if override.endswith(".jinja"):
            file = resolve_data_path(override, TEMPLATE_KEY)
            return ChatTemplate(file.read_text(encoding="utf-8"), special, str(file))
        if "{{" not in override and "{%" not in override:
            raise UserError(f"{TEMPLATE_KEY}: '{override}' is neither a .jinja file nor a Jinja template "
                            f"(no '{{{{' or '{{%'); give a path ending in .jinja or the template text")
        return ChatTemplate(override, special, f"{TEMPLATE_KEY} (a literal template)")
    if (folder / TEMPLATE_FILE).is_file():
        file = folder / TEMPLATE_FILE
        return ChatTemplate(file.read_text(encoding="utf-8"), special, str(file))
    source = config.get("chat_template")
    if isinstance(source, list):
        source = _pick_named(source, str(config_path))
    if not source:
        raise UserError(f"{TEMPLATE_KEY}: the tokenizer in {folder} has no chat template (no {TEMPLATE_FILE}, "
                        f"no chat_template in {CONFIG_FILE}); set {TEMPLATE_KEY} to a .jinja file or a "
                        f"template string")
    return ChatTemplate(source, special, f"the chat_template of {config_path}")


# --- rows -> messages ---------------------------------------------------------------------------------

def _text_field(row: dict, key: str, where: str, optional: bool = False) -> str:
    value = row.get(key, "" if optional else None)
    if not isinstance(value, str) or not (optional or value.strip()):
        kind = "a string" if optional else "a non-empty string"
        raise UserError(f"{where}: '{key}' must be {kind}, got {json.dumps(value)[:60]}; fix the row")
    return value


def validate_messages(messages, where: str) -> list[dict[str, str]]:
    """A conversation checked and copied as [{"role", "content"}] (other keys of a message are left out)."""
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: 'messages' must be a non-empty list of {{\"role\", \"content\"}} objects; "
                        f"fix the row")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise UserError(f"{where}: message {i} is not an object with 'role' and 'content'; fix the row")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise UserError(f"{where}: message {i} has role {json.dumps(role)}; the allowed roles are "
                            f"{', '.join(ROLES)}")
        # An empty system message is meaningful: templates that add a default one (SmolLM2's) then don't.
        if not isinstance(content, str) or not (content.strip() or role == "system" and content == ""):
            raise UserError(f"{where}: message {i} ({role}) content must be a non-empty string, got "
                            f"{json.dumps(content)[:60]}; fix the row")
        out.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in out):
        raise UserError(f"{where}: the conversation has no assistant message, so nothing to learn; "
                        f"add the reply or remove the row")
    return out


def row_to_messages(row, where: str) -> list[dict[str, str]]:
    """A data row -> a validated conversation. Alpaca rows: the user message is the instruction, then a
    blank line and the input when there is one. Prompt/response rows are taken verbatim (llm-foundry's
    prompts often carry their own prompt template, e.g. "### Instruction: ... ### Response:")."""
    if not isinstance(row, dict):
        raise UserError(f"{where}: a row must be a JSON object with {ROW_SHAPES}")
    if "messages" in row:
        messages = row["messages"]
    elif "instruction" in row:
        instruction, extra = _text_field(row, "instruction", where), _text_field(row, "input", where, True)
        user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        messages = [{"role": "user", "content": user},
                    {"role": "assistant", "content": _text_field(row, "output", where)}]
    elif "prompt" in row:
        messages = [{"role": "user", "content": _text_field(row, "prompt", where)},
                    {"role": "assistant", "content": _text_field(row, "response", where)}]
    else:
        raise UserError(f"{where}: a row needs {ROW_SHAPES}; it has {', '.join(map(repr, row)) or 'no keys'}")
    return validate_messages(messages, where)


# --- messages -> token ids and loss mask --------------------------------------------------------------

@dataclass(frozen=True)
class ChatInfo:
    """What tokenize_conversation did to fit a conversation."""
    dropped_messages: int = 0   # earliest messages removed (whole exchanges, never a leading system one)
    cut_tokens: int = 0         # tokens cut from the end when the last exchange alone did not fit
    dropped: bool = False       # nothing left to learn: leave the conversation out (ids and mask are empty)
    merged_boundaries: int = 0  # prompt/answer boundaries that fell inside a token (see _mask)

    @property
    def truncated(self) -> bool:
        return bool(self.dropped_messages or self.cut_tokens)


@functools.lru_cache(maxsize=4)
def _offsets_tokenizer(tokenizer: Tokenizer) -> tuple[Tokenizer, frozenset[int]]:
    """A copy of `tokenizer` without post-processor, truncation or padding, and its special token ids.
    The ids are the same (no special tokens are added), but the offsets are the model's own: GPT-2-style
    post-processors trim whitespace off them (trim_offsets), which would hide a space merged into a
    token across a boundary."""
    copy = Tokenizer.from_str(tokenizer.to_str())
    copy.post_processor = None
    copy.no_truncation()
    copy.no_padding()
    return copy, frozenset(i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special)


def _answer_spans(messages: list[dict], template: ChatTemplate, train_on: str,
                  where: str) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of the answers that carry loss."""
    full = template.render(messages, where=where)
    if train_on == "all":
        return full, []
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    spans, previous = [], ""
    for i in turns if train_on == "assistant" else turns[-1:]:
        prompt = template.render(messages[:i], add_generation_prompt=True, where=where)
        answered = template.render(messages[:i + 1], where=where)
        for before, after, what in ((previous, prompt, f"the messages before message {i} with the "
                                     f"generation prompt"), (prompt, answered, f"messages 0 to {i}")):
            if not after.startswith(before):
                at = next(k for k, (a, b) in enumerate(zip(before, after + "\0")) if a != b)
                raise UserError(
                    f"{where}: this chat template cannot be split into prompt and answer (rendering {what} "
                    f"does not extend the text before it: {before[at:at + 30]!r} became {after[at:at + 30]!r}); "
                    f"use a template whose assistant turns extend the generation prompt, in {TEMPLATE_KEY}")
        spans.append((len(prompt), len(answered)))
        previous = answered
    if not full.startswith(previous):
        raise UserError(f"{where}: this chat template cannot be split into prompt and answer (the whole "
                        f"conversation does not extend its rendering through the last answer); use "
                        f"another template in {TEMPLATE_KEY}")
    return full, spans


def _mask(text: str, spans: list[tuple[int, int]], tokenizer: Tokenizer,
          train_on: str) -> tuple[list[int], list[int], int]:
    """Token ids of `text` in one go, their loss mask and how many span boundaries fall inside a token.

    The text is tokenized once and spans are placed by character offsets, rather than tokenizing the
    pieces and joining them: the ids are the one-shot ids by construction, and where pieces would
    tokenize differently (a boundary inside a token: "Assistant: " + "Hello" is one-shot ':', ' Hello')
    the token shows as crossing the boundary. A token carries loss when its first character does, as the
    model generates tokens that start after the prompt; the merged ' Hello' starts in the prompt and
    carries none."""
    copy, special_ids = _offsets_tokenizer(tokenizer)
    encoding = copy.encode(text, add_special_tokens=False)
    ids = encoding.ids
    if train_on == "all":
        return ids, [1] * len(ids), 0
    starts = [start for start, _ in encoding.offsets]
    mask, merged = [0] * len(ids), 0
    for begin, end in spans:
        first, stop = bisect.bisect_left(starts, begin), bisect.bisect_left(starts, end)
        merged += sum(k > 0 and encoding.offsets[k - 1][1] > b
                      for k, b in ((first, begin), (stop, end)))
        last = next((t for t in range(stop - 1, first - 1, -1) if ids[t] in special_ids), stop - 1)
        mask[first:last + 1] = [1] * (last + 1 - first)
    return ids, mask, merged


def _exchange_starts(messages: list[dict], head: int) -> list[int]:
    """Where the conversation may be cut after its `head` leading system messages: before each user
    message, up to the exchange holding the last assistant turn."""
    last_answer = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return [i for i in range(head + 1, last_answer) if messages[i]["role"] == "user"]


def tokenize_conversation(messages: list[dict], template: ChatTemplate, tokenizer: Tokenizer, train_on: str,
                          max_seq_len: int, where: str = "conversation") -> tuple[list[int], list[int], ChatInfo]:
    """Validated `messages` -> (input_ids, loss_mask, info). input_ids equal tokenizing the rendered
    conversation in one go without added special tokens (as apply_chat_template(tokenize=True) does);
    loss_mask[t] = 1 where token t is a training target: the answers and their end token (`assistant`),
    the final answer only (`last`), or every token (`all`). Fitting to max_seq_len: see the module doc."""
    assert train_on in TRAIN_ON, train_on
    head = next((i for i, m in enumerate(messages) if m["role"] != "system"), len(messages))
    for cut in [head, *_exchange_starts(messages, head)]:
        kept = messages[:head] + messages[cut:]
        text, spans = _answer_spans(kept, template, train_on, where)
        ids, mask, merged = _mask(text, spans, tokenizer, train_on)
        if len(ids) <= max_seq_len:
            return ids, mask, ChatInfo(dropped_messages=cut - head, merged_boundaries=merged)
    cut_tokens = len(ids) - max_seq_len
    ids, mask = ids[:max_seq_len], mask[:max_seq_len]
    if not any(mask[1:]):
        return [], [], ChatInfo(dropped_messages=cut - head, cut_tokens=cut_tokens, dropped=True,
                                merged_boundaries=merged)
    return ids, mask, ChatInfo(dropped_messages=cut - head, cut_tokens=cut_tokens, merged_boundaries=merged)
