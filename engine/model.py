"""The Llama family (Llama, Qwen2, Mistral) over a paged KV cache.

Projections are fused (q/k/v into one matrix, gate/up into another) and built from the
tensor-parallel layers of `tp_layers.py`, which hold this rank's shard and communicate as their
split needs; at TP size 1 they are plain layers. The KV cache holds this rank's KV heads.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from functools import partial

import torch
from torch import nn

from pdserve.api.errors import ModelLoadError
from pdserve.engine.attention import AttentionBatch, paged_attention
from pdserve.engine.config import ModelConfig
from pdserve.engine.parallel import SINGLE, TPGroup
from pdserve.engine.tp_layers import (
    ColumnParallelLinear,
    ParallelLMHead,
    Part,
    Replicated,
    RowParallelLinear,
    VocabParallelEmbedding,
)
from pdserve.engine.weights import LazyTensor
from pdserve.kernels import rms_norm, rope_cos_sin_cache, rotary_embedding

Loader = Callable[[LazyTensor], None]
_QKV_BIAS = re.compile(r"model\.layers\.\d+\.self_attn\.[qkv]_proj\.bias")


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TPGroup, dtype: torch.dtype, device) -> None:
        super().__init__()
        d = cfg.head_dim
        try:
            heads = tp.shard(cfg.num_heads, "num_attention_heads")
            kv_heads = tp.kv_heads(cfg.num_kv_heads)
            inter = tp.shard(cfg.intermediate_size, "intermediate_size")
        except ValueError as e:
            raise ModelLoadError(str(e)) from e
        self.heads, self.kv_heads, self.head_dim = len(heads), len(kv_heads), d
        self.q_size, self.kv_size = self.heads * d, self.kv_heads * d
        self.eps = cfg.rms_norm_eps
        self.scale = d**-0.5
        q_rows = Part("q", cfg.num_heads * d, range(heads.start * d, heads.stop * d))
        kv_rows = range(kv_heads.start * d, kv_heads.stop * d)
        kw = dict(dtype=dtype, device=device)
        self.input_norm = Replicated(cfg.hidden_size, **kw)
        self.post_attention_norm = Replicated(cfg.hidden_size, **kw)
        self.qkv = ColumnParallelLinear(
            cfg.hidden_size,
            [
                q_rows,
                Part("k", cfg.num_kv_heads * d, kv_rows),
                Part("v", cfg.num_kv_heads * d, kv_rows),
            ],
            cfg.qkv_bias,
            **kw,
        )
        self.o = RowParallelLinear(cfg.hidden_size, q_rows, tp, **kw)
        i = Part("gate", cfg.intermediate_size, inter)
        self.gate_up = ColumnParallelLinear(
            cfg.hidden_size, [i, Part("up", i.full, i.owned)], False, **kw
        )
        self.down = RowParallelLinear(cfg.hidden_size, i, tp, **kw)

    def loaders(self, prefix: str, qkv_bias: bool) -> dict[str, Loader]:
        """The checkpoint tensors of this layer, and where each goes."""
        out: dict[str, Loader] = {
            prefix + "input_layernorm.weight": self.input_norm.load,
            prefix + "post_attention_layernorm.weight": self.post_attention_norm.load,
            prefix + "self_attn.o_proj.weight": self.o.load,
            prefix + "mlp.down_proj.weight": self.down.load,
        }
        for x in "qkv":
            out[f"{prefix}self_attn.{x}_proj.weight"] = partial(self.qkv.load, x)
            if qkv_bias:
                out[f"{prefix}self_attn.{x}_proj.bias"] = partial(self.qkv.load, x, bias=True)
        for x in ("gate", "up"):
            out[f"{prefix}mlp.{x}_proj.weight"] = partial(self.gate_up.load, x)
        return out

    def attention(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        cos_sin: torch.Tensor,
        batch: AttentionBatch,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Writes every token's K/V to the cache; returns the attention block's output for the
        tokens at `rows` (all when None)."""
        t = x.shape[0]
        qkv = self.qkv(x)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = rotary_embedding(
            q.view(t, self.heads, self.head_dim),
            k.view(t, self.kv_heads, self.head_dim),
            positions,
            cos_sin,
        )
        v = v.view(t, self.kv_heads, self.head_dim)
        out = paged_attention(q, k, v, k_cache, v_cache, batch, self.scale).reshape(t, self.q_size)
        return self.o(out if rows is None else out.index_select(0, rows))

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.gate_up.silu_and_mul(x))


class CausalLM(nn.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        tp: TPGroup = SINGLE,
    ) -> None:
        super().__init__()
        self.cfg, self.tp = cfg, tp
        kw = dict(dtype=dtype, device=device)
        self.embed = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, tp, **kw)
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, tp, dtype, device) for _ in range(cfg.num_layers)
        )
        self.norm = Replicated(cfg.hidden_size, **kw)
        tied = self.embed if cfg.tie_word_embeddings else None
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, tp, **kw, tied=tied)
        self.register_buffer(
            "cos_sin",
            rope_cos_sin_cache(
                cfg.head_dim,
                cfg.max_position_embeddings,
                cfg.rope_theta,
                cfg.rope_scaling,
                dtype=torch.float32,
                device=device,
            ),
            persistent=False,
        )

    @property
    def weight_bytes(self) -> int:
        """This rank's parameter memory (a tied LM head counted once)."""
        return sum(p.numel() * p.element_size() for p in self.parameters())

    @property
    def num_kv_heads(self) -> int:
        return self.layers[0].kv_heads

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        batch: AttentionBatch,
        kv_cache: torch.Tensor,
        on_layer_kv: Callable[[int], None] | None = None,
        keep: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Returns the final hidden states (after the last norm) of the tokens at rows `keep`
        of the batch, `[len(keep), hidden]` (of all `T` tokens when None).

        `kv_cache` is `[num_layers, 2, num_blocks, kv_heads, block_size, head_dim]`.
        `on_layer_kv(i)` runs as soon as layer i's KV is in the cache, so a prefill worker
        can ship it while the next layers compute.

        NOTE: a token's hidden state depends on the other tokens only through attention, which
        reads their K/V from the cache; so the last layer writes every token's K/V but runs its
        attention output projection, MLP and norm for the `keep` rows alone (a prefill chunk
        samples from its last token, or from none). That saves most of one layer's GEMMs of
        every prompt token, and gives the kept rows the same result.
        """
        h = self.embed(input_ids)
        residual = None
        for i, layer in enumerate(self.layers):
            if residual is None:
                residual, x = h, rms_norm(h, layer.input_norm.weight, layer.eps)
            else:
                x, residual = rms_norm(h, layer.input_norm.weight, layer.eps, residual)
            rows = keep if i == len(self.layers) - 1 else None
            h = layer.attention(
                x, positions, self.cos_sin, batch, kv_cache[i, 0], kv_cache[i, 1], rows
            )
            if on_layer_kv is not None:
                on_layer_kv(i)
            if rows is not None:
                residual = residual.index_select(0, rows)
            x, residual = rms_norm(h, layer.post_attention_norm.weight, layer.eps, residual)
            h = layer.mlp(x)
        out, _ = rms_norm(h, self.norm.weight, self.cfg.rms_norm_eps, residual)
        return out

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """float32 logits on rank 0 (None on the other ranks, which take part in the gather)."""
        return self.lm_head(hidden)

    def load_weights(self, weights: Iterable[LazyTensor]) -> None:
        """Reads this rank's shard of every Hugging Face tensor into the fused parameters."""
        cfg = self.cfg
        loaders: dict[str, Loader] = {
            "model.embed_tokens.weight": self.embed.load,
            "model.norm.weight": self.norm.load,
        }
        if not cfg.tie_word_embeddings:
            loaders["lm_head.weight"] = self.lm_head.load
        for i, layer in enumerate(self.layers):
            loaders |= layer.loaders(f"model.layers.{i}.", cfg.qkv_bias)
        missing = set(loaders)
        for src in weights:
            load = loaders.get(src.name)
            if load is None:
                if _QKV_BIAS.fullmatch(src.name):
                    raise ModelLoadError(
                        f"tensor '{src.name}' is present but the config has no qkv bias"
                    )
                continue  # tensors the Llama family does not use (rotary caches, ...)
            load(src)
            missing.discard(src.name)
        if missing:
            first = sorted(missing)[0]
            raise ModelLoadError(f"checkpoint is missing tensor '{first}' ({len(missing)} missing)")
