"""BERT and RoBERTa, all of it in this file: config, embeddings, post-norm blocks with SDPA attention
under a padding mask, the masked-LM and classification heads, and the two networks training uses.

RoBERTa is BERT with two differences, both set by `family` (a switch, not a second model):

    positions    BERT: 0, 1, 2, ... for every token. RoBERTa: real tokens count from pad_token_id + 1
                 and padding sits at pad_token_id (fairseq's make_positions), so its position table
                 has pad_token_id + 1 more rows than the longest sequence.
    token types  BERT: segment A / B embeddings. RoBERTa: one row (type_vocab_size 1), in effect a
                 learned bias added to every token; it has no segments.
    class head   BERT: dropout(tanh(pooler([CLS]))) -> linear. RoBERTa: dropout -> dense -> tanh ->
                 dropout -> out_proj on <s>. Same tensors (dense, out), dropout placed differently.

Parameter names map onto transformers' BertModel / BertForMaskedLM / BertForSequenceClassification
and the RoBERTa classes through the literal tables in models/bert.py (q/k/v are fused here into
one [q; k; v] matrix), and hidden states and logits match transformers to float precision
(test/test_encoders.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rafale.models.configs import EncoderConfig
from rafale.models.family import ModelError

class Attention(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.n_heads, self.head_dim, self.p_drop = cfg.n_heads, cfg.head_dim, cfg.attn_dropout
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)  # rows [q; k; v], each (nh * hs)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """x (B, T, C); mask (B, 1, 1, T) bool, True where a key may be attended to, or None (no padding)."""
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (B, nh, T, hs) x 3
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                           dropout_p=self.p_drop if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class Block(nn.Module):
    """Post-norm, as BERT: x = norm1(x + attn(x)); x = norm2(x + mlp(x))."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.attn = Attention(cfg)
        self.norm1 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.fc_in = nn.Linear(cfg.d_model, cfg.d_ff)
        self.fc_out = nn.Linear(cfg.d_ff, cfg.d_model)
        self.norm2 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = self.norm1(x + self.drop(self.attn(x, mask)))
        # Exact erf GELU: BERT's and RoBERTa's hidden_act "gelu".
        return self.norm2(x + self.drop(self.fc_out(F.gelu(self.fc_in(x)))))


class Encoder(nn.Module):
    """Token ids (B, T) -> hidden states (B, T, C): transformers' BertModel / RobertaModel without pooler."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model, padding_idx=cfg.pad_token_id)
        # RoBERTa's padding position (pad_token_id) is a padding_idx too: zero at init, never trained.
        self.embed_positions = nn.Embedding(cfg.n_positions, cfg.d_model,
                                            padding_idx=cfg.pad_token_id if cfg.family == "roberta" else None)
        self.embed_types = nn.Embedding(cfg.type_vocab_size, cfg.d_model)
        self.embed_norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))

    def positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T) position ids: 0..T-1 (BERT); RoBERTa counts real tokens from pad_token_id + 1 and puts
        padding at pad_token_id (transformers' create_position_ids_from_input_ids)."""
        if self.cfg.family == "bert":
            return torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        real = input_ids.ne(self.cfg.pad_token_id).int()
        return torch.cumsum(real, dim=1) * real + self.cfg.pad_token_id

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (B, T); attention_mask (B, T), 1 for tokens and 0 for padding (None: no padding);
        token_type_ids (B, T) segment ids (None: all 0)."""
        B, T = input_ids.shape
        if T > self.cfg.max_seq_len:
            raise ValueError(f"{T} tokens exceed the model's max_seq_len ({self.cfg.max_seq_len})")
        x = self.embed_tokens(input_ids) + self.embed_positions(self.positions(input_ids))  # (B, T, C)
        x = x + (self.embed_types(token_type_ids) if token_type_ids is not None else self.embed_types.weight[0])
        x = self.drop(self.embed_norm(x))
        mask = attention_mask.bool()[:, None, None, :] if attention_mask is not None else None  # (B, 1, 1, T)
        for block in self.blocks:
            x = block(x, mask)
        return x


class MaskedLMHead(nn.Module):
    """dense -> GELU -> LayerNorm -> logits over the vocabulary, with the word embeddings as the output
    matrix (tied, as in BERT and RoBERTa) plus a bias of its own."""

    def __init__(self, cfg: EncoderConfig, embedding: nn.Embedding):
        super().__init__()
        self.dense = nn.Linear(cfg.d_model, cfg.d_model)
        self.norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.decoder = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.decoder.weight = embedding.weight  # one tensor under both names
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.norm(F.gelu(self.dense(h)))) + self.bias


class ClassificationHead(nn.Module):
    """The first token's hidden state -> class logits. BERT: pooler (dense + tanh), dropout, out.
    RoBERTa: dropout, dense, tanh, dropout, out_proj. `dense` and `out` in both."""

    def __init__(self, cfg: EncoderConfig, num_labels: int):
        super().__init__()
        self.roberta = cfg.family == "roberta"
        self.dense = nn.Linear(cfg.d_model, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout if cfg.classifier_dropout is None else cfg.classifier_dropout)
        self.out = nn.Linear(cfg.d_model, num_labels)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = h[:, 0]  # (B, C): [CLS] / <s>
        if self.roberta:
            x = self.drop(x)
        return self.out(self.drop(torch.tanh(self.dense(x))))


class _Network(nn.Module):
    """An Encoder and a head: the one child of the Composer wrapper (rafale/task_model.py), so
    Composer can FSDP-wrap it as a whole and each block inside it."""

    encoder: Encoder
    head: nn.Module

    @torch.no_grad()
    def param_init_fn(self, module: nn.Module) -> None:
        """transformers' BertPreTrainedModel._init_weights, per module (Composer calls it after meta init)."""
        std = self.encoder.cfg.init_std
        if isinstance(module, nn.Linear):
            if module is not getattr(self.head, "decoder", None):  # the tied embedding is set below
                nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.padding_idx is not None:
                module.weight[module.padding_idx].zero_()
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, MaskedLMHead):
            nn.init.zeros_(module.bias)

    def fsdp_wrap_fn(self, module: nn.Module) -> bool:
        return isinstance(module, Block)

    def activation_checkpointing_fn(self, module: nn.Module) -> bool:
        return isinstance(module, Block)


class EncoderForMaskedLM(_Network):
    """transformers' BertForMaskedLM / RobertaForMaskedLM."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.head = MaskedLMHead(cfg, self.encoder.embed_tokens)
        self.apply(self.param_init_fn)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, predict: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, V); with `predict` (B, T) bool, only at those positions: (N, V). Training
        predicts the ~15% masked tokens only, so the head's (V x C) matmul runs on them alone."""
        h = self.encoder(input_ids, attention_mask, token_type_ids)
        return self.head(h[predict] if predict is not None else h)


class EncoderForClassification(_Network):
    """transformers' BertForSequenceClassification / RobertaForSequenceClassification (single label)."""

    def __init__(self, cfg: EncoderConfig, num_labels: int):
        super().__init__()
        if num_labels < 2:
            raise ModelError(f"a classifier needs at least 2 labels, the data has {num_labels}")
        self.cfg, self.num_labels = cfg, num_labels
        self.encoder = Encoder(cfg)
        self.head = ClassificationHead(cfg, num_labels)
        self.apply(self.param_init_fn)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.encoder(input_ids, attention_mask, token_type_ids))  # (B, num_labels)
