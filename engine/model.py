"""The Llama family (Llama, Qwen2, Mistral) over a paged KV cache.

Projections are fused at load time (q/k/v into one matrix, gate/up into another) and sharded
for tensor parallelism: column-parallel QKV and gate/up, row-parallel output and down
projections followed by an all-reduce. Embeddings and the LM head are replicated.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from pdserve.api.errors import ModelLoadError
from pdserve.engine.attention import AttentionBatch, paged_attention
from pdserve.engine.config import ModelConfig
from pdserve.engine.parallel import SINGLE, TensorParallel
from pdserve.kernels import linear, rms_norm, rope_cos_sin_cache, rotary_embedding

_QKV_NAME = re.compile(r"self_attn\.([qkv])_proj\.(weight|bias)")


def _param(*shape: int, dtype: torch.dtype, device: torch.device | str) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TensorParallel, dtype: torch.dtype, device) -> None:
        super().__init__()
        h0, h1 = tp.shard(cfg.num_heads, "num_attention_heads")
        kv0, kv1 = tp.shard(cfg.num_kv_heads, "num_key_value_heads")
        i0, i1 = tp.shard(cfg.intermediate_size, "intermediate_size")
        self.heads, self.kv_heads, self.head_dim = h1 - h0, kv1 - kv0, cfg.head_dim
        self.intermediate = i1 - i0
        self.q_size = self.heads * cfg.head_dim
        self.kv_size = self.kv_heads * cfg.head_dim
        self.eps = cfg.rms_norm_eps
        self.scale = cfg.head_dim**-0.5
        self.tp = tp
        kw = dict(dtype=dtype, device=device)
        self.input_norm = _param(cfg.hidden_size, **kw)
        self.post_attention_norm = _param(cfg.hidden_size, **kw)
        self.qkv = _param(self.q_size + 2 * self.kv_size, cfg.hidden_size, **kw)
        self.qkv_bias = _param(self.q_size + 2 * self.kv_size, **kw) if cfg.qkv_bias else None
        self.o = _param(cfg.hidden_size, self.q_size, **kw)
        self.gate_up = _param(2 * self.intermediate, cfg.hidden_size, **kw)
        self.down = _param(cfg.hidden_size, self.intermediate, **kw)

    def attention(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        cos_sin: torch.Tensor,
        batch: AttentionBatch,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
    ) -> torch.Tensor:
        t = x.shape[0]
        qkv = linear(x, self.qkv, self.qkv_bias)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = rotary_embedding(
            q.view(t, self.heads, self.head_dim),
            k.view(t, self.kv_heads, self.head_dim),
            positions,
            cos_sin,
        )
        v = v.view(t, self.kv_heads, self.head_dim)
        out = paged_attention(q, k, v, k_cache, v_cache, batch, self.scale)
        return self.tp.all_reduce(linear(out.reshape(t, self.q_size), self.o))

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = linear(x, self.gate_up).chunk(2, dim=-1)
        return self.tp.all_reduce(linear(F.silu(gate) * up, self.down))


class CausalLM(nn.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        tp: TensorParallel = SINGLE,
    ) -> None:
        super().__init__()
        self.cfg, self.tp = cfg, tp
        kw = dict(dtype=dtype, device=device)
        self.embed = _param(cfg.vocab_size, cfg.hidden_size, **kw)
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, tp, dtype, device) for _ in range(cfg.num_layers)
        )
        self.norm = _param(cfg.hidden_size, **kw)
        self.lm_head = (
            self.embed if cfg.tie_word_embeddings else _param(cfg.vocab_size, cfg.hidden_size, **kw)
        )
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
    def num_kv_heads(self) -> int:
        return self.layers[0].kv_heads

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        batch: AttentionBatch,
        kv_cache: torch.Tensor,
        on_layer_kv: Callable[[int], None] | None = None,
    ) -> torch.Tensor:
        """Returns the final hidden states `[T, hidden]` (after the last norm).

        `kv_cache` is `[num_layers, 2, num_blocks, kv_heads, block_size, head_dim]`.
        `on_layer_kv(i)` runs as soon as layer i's KV is in the cache, so a prefill worker
        can ship it while the next layers compute.
        """
        h = F.embedding(input_ids, self.embed)
        residual = None
        for i, layer in enumerate(self.layers):
            if residual is None:
                residual, x = h, rms_norm(h, layer.input_norm, layer.eps)
            else:
                x, residual = rms_norm(h, layer.input_norm, layer.eps, residual)
            h = layer.attention(x, positions, self.cos_sin, batch, kv_cache[i, 0], kv_cache[i, 1])
            if on_layer_kv is not None:
                on_layer_kv(i)
            x, residual = rms_norm(h, layer.post_attention_norm, layer.eps, residual)
            h = layer.mlp(x)
        out, _ = rms_norm(h, self.norm, self.cfg.rms_norm_eps, residual)
        return out

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return linear(hidden, self.lm_head).float()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copies Hugging Face tensors into the fused, sharded parameters of this rank."""
        cfg, d = self.cfg, self.cfg.head_dim
        h0, h1 = self.tp.shard(cfg.num_heads, "num_attention_heads")
        kv0, kv1 = self.tp.shard(cfg.num_kv_heads, "num_key_value_heads")
        i0, i1 = self.tp.shard(cfg.intermediate_size, "intermediate_size")
        loaded: set[str] = set()
        for name, w in weights:
            target = self._place(name, w, h0 * d, h1 * d, kv0 * d, kv1 * d, i0, i1)
            if target is not None:
                loaded.add(target)
        expected = {"model.embed_tokens.weight", "model.norm.weight"}
        if not cfg.tie_word_embeddings:
            expected.add("lm_head.weight")
        for i in range(cfg.num_layers):
            p = f"model.layers.{i}."
            expected |= {
                p + s
                for s in (
                    "input_layernorm.weight",
                    "post_attention_layernorm.weight",
                    "self_attn.q_proj.weight",
                    "self_attn.k_proj.weight",
                    "self_attn.v_proj.weight",
                    "self_attn.o_proj.weight",
                    "mlp.gate_proj.weight",
                    "mlp.up_proj.weight",
                    "mlp.down_proj.weight",
                )
            }
            if cfg.qkv_bias:
                expected |= {p + f"self_attn.{x}_proj.bias" for x in "qkv"}
        missing = sorted(expected - loaded)
        if missing:
            raise ModelLoadError(
                f"checkpoint is missing tensor '{missing[0]}' ({len(missing)} missing)"
            )

    def _place(
        self, name: str, w: torch.Tensor, q0: int, q1: int, k0: int, k1: int, i0: int, i1: int
    ) -> str | None:
        cfg = self.cfg
        if name == "model.embed_tokens.weight":
            return self._copy(name, self.embed, w)
        if name == "model.norm.weight":
            return self._copy(name, self.norm, w)
        if name == "lm_head.weight":
            return None if cfg.tie_word_embeddings else self._copy(name, self.lm_head, w)
        if not name.startswith("model.layers."):
            return None
        idx, _, rest = name[len("model.layers.") :].partition(".")
        if not idx.isdigit() or int(idx) >= cfg.num_layers:
            return None
        layer: DecoderLayer = self.layers[int(idx)]
        qs, kvs = layer.q_size, layer.kv_size
        kvd = cfg.num_kv_heads * cfg.head_dim
        qkv_slices = {
            "q": (slice(0, qs), slice(q0, q1)),
            "k": (slice(qs, qs + kvs), slice(k0, k1)),
            "v": (slice(qs + kvs, qs + 2 * kvs), slice(k0, k1)),
        }
        if rest in ("input_layernorm.weight", "post_attention_layernorm.weight"):
            target = layer.input_norm if rest.startswith("input") else layer.post_attention_norm
            return self._copy(name, target, w)
        m = _QKV_NAME.fullmatch(rest)
        if m:
            which, kind = m.groups()
            dst, src = qkv_slices[which]
            full = cfg.num_heads * cfg.head_dim if which == "q" else kvd
            target = layer.qkv if kind == "weight" else layer.qkv_bias
            if target is None:
                raise ModelLoadError(f"tensor '{name}' is present but the config has no qkv bias")
            return self._copy(name, target[dst], w, rows=(src, full))
        if rest == "self_attn.o_proj.weight":
            return self._copy(name, layer.o, w, cols=(slice(q0, q1), cfg.num_heads * cfg.head_dim))
        if rest in ("mlp.gate_proj.weight", "mlp.up_proj.weight"):
            n = layer.intermediate
            dst = slice(0, n) if "gate" in rest else slice(n, 2 * n)
            return self._copy(
                name, layer.gate_up[dst], w, rows=(slice(i0, i1), cfg.intermediate_size)
            )
        if rest == "mlp.down_proj.weight":
            return self._copy(name, layer.down, w, cols=(slice(i0, i1), cfg.intermediate_size))
        return None

    @staticmethod
    def _copy(
        name: str,
        dst: torch.Tensor,
        w: torch.Tensor,
        rows: tuple[slice, int] | None = None,
        cols: tuple[slice, int] | None = None,
    ) -> str:
        """Copies `w` (optionally this rank's rows or columns of it) into `dst`, checking shapes."""
        if rows is not None:
            if w.shape[0] != rows[1]:
                raise ModelLoadError(f"tensor '{name}' has {w.shape[0]} rows, expected {rows[1]}")
            w = w[rows[0]]
        if cols is not None:
            if w.shape[-1] != cols[1]:
                raise ModelLoadError(
                    f"tensor '{name}' has {w.shape[-1]} columns, expected {cols[1]}"
                )
            w = w[:, cols[0]]
        if tuple(w.shape) != tuple(dst.shape):
            raise ModelLoadError(
                f"tensor '{name}' has shape {tuple(w.shape)}, expected {tuple(dst.shape)}"
            )
        with torch.no_grad():
            dst.copy_(w)
        return name
