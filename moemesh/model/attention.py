"""Multi-head latent attention (MLA) over the paged latent cache.

Per token and layer the cache keeps `kv_lora_rank + qk_rope_head_dim` values (576 in V3): the RMS-normed KV
latent and the roped shared key. Prefill expands the latent into per-head K/V (`kv_b_proj`) and attends
causally, a cached prefix included. Decode absorbs `kv_b_proj` into the query and the output and attends in the
latent space, reading only the cache:

    q_latent[h] = q_nope[h] @ W_UK[h]          scores = q_latent . latent + q_pe . k_pe
    out[h]      = (softmax(scores) @ latent) @ W_UV[h]^T
"""

from __future__ import annotations

import torch
from torch import nn

from moemesh.kernels import (
    NormOutputs,
    RopeTables,
    StoreExtras,
    mla_decode,
    mla_prefill,
    rope,
    store_kv,
    weight_dequant,
)
from moemesh.kernels.mla_prefill import Prefix
from moemesh.model.batch import ForwardBatch
from moemesh.model.config import ModelConfig
from moemesh.model.layers import InputFormats, RMSNorm
from moemesh.model.rope import RotaryEmbedding, softmax_scale
from moemesh.model.stacked import Stacked, stack_linears


def gather_latent(kv_cache: torch.Tensor, pages: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` cache rows of one sequence: [length, kv_cache_dim]."""
    page_size = kv_cache.shape[1]
    num_pages = -(-length // page_size)
    return kv_cache[pages[:num_pages].long()].reshape(-1, kv_cache.shape[-1])[:length]


def _int32_on(values, device: torch.device) -> torch.Tensor:
    """Host ints as int32 on `device`. On CUDA through pinned memory, not blocking: a plain host-to-device copy
    synchronizes the stream, a stall in every layer of a prefill forward (the CPU then relaunches while the GPU
    idles, longer still when another thread holds the GIL)."""
    t = torch.tensor(values, dtype=torch.int32)
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t.to(device)


class MLAttention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        c = config
        self.num_heads = c.num_attention_heads
        self.kv_lora_rank = c.kv_lora_rank
        self.qk_nope_head_dim, self.qk_rope_head_dim = c.qk_nope_head_dim, c.qk_rope_head_dim
        self.v_head_dim = c.v_head_dim
        self.q_lora_rank = c.q_lora_rank
        qk_dim = self.num_heads * c.qk_head_dim
        if c.q_lora_rank is None:
            self.q_proj = nn.Linear(c.hidden_size, qk_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(c.hidden_size, c.q_lora_rank, bias=c.attention_bias)
            self.q_a_layernorm = RMSNorm(c.q_lora_rank, c.rms_norm_eps)
            self.q_b_proj = nn.Linear(c.q_lora_rank, qk_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(c.hidden_size, c.kv_cache_dim, bias=c.attention_bias)
        self.kv_a_layernorm = RMSNorm(c.kv_lora_rank, c.rms_norm_eps)
        self.kv_b_proj = nn.Linear(
            c.kv_lora_rank, self.num_heads * (c.qk_nope_head_dim + c.v_head_dim), bias=False
        )
        self.o_proj = nn.Linear(self.num_heads * c.v_head_dim, c.hidden_size, bias=c.attention_bias)
        self.scale = softmax_scale(c)

    def forward(
        self,
        x: torch.Tensor,
        batch: ForwardBatch,
        kv_cache: torch.Tensor,
        rotary: RotaryEmbedding,
        rope_tables: RopeTables,
        normed: NormOutputs | None = None,
    ) -> torch.Tensor:
        """x [T, hidden] -> [T, hidden]; writes the new tokens' latent KV into `kv_cache` [pages, page_size, 576].
        `normed`: the norm's outputs x came from (its FP8 form, when written, feeds FP8 input projections)."""
        num_tokens = x.shape[0]
        x_fp8 = None if normed is None or normed.y_fp8 is None else (normed.y_fp8, normed.y_scale)
        q, kv = self._project_input(
            x, x_fp8
        )  # [T, H * (nope + rope)] or [T, q_lora_rank]; [T, kv_lora_rank + rope]
        if self.q_lora_rank is not None:
            q = self.q_b_proj(self.q_a_layernorm(q))
        q = q.view(num_tokens, self.num_heads, -1)  # [T, H, nope + rope]
        q_nope, q_pe = q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        latent, k_pe = kv.split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        if batch.is_decode:
            # the absorbed query [T, H, kv_lora_rank + rope] is assembled in place: head-major storage, so the
            # q_nope @ W_UK GEMM writes its rows with a leading dimension of 576 and RoPE writes q_pe beside them
            q_full = torch.empty(
                self.num_heads,
                num_tokens,
                self.kv_lora_rank + self.qk_rope_head_dim,
                dtype=q.dtype,
                device=q.device,
            ).transpose(0, 1)
            q_pe_out = q_full[..., self.kv_lora_rank :]
        else:
            q_pe_out = q_pe
        norm = self.kv_a_layernorm
        if rotary.interleaved and norm.weight.dtype == latent.dtype:
            # DeepSeek's layout: one launch norms the latent, ropes k_pe and q_pe, and stores the cache row
            extras = StoreExtras(norm.weight, norm.eps, q_pe, q_pe_out)
            store_kv(kv_cache, latent, k_pe, batch.slot_mapping, rope=rope_tables, extras=extras)
        elif rotary.interleaved:
            rope(q_pe, rope_tables.positions, rope_tables.cos_cache, rope_tables.sin_cache, out=q_pe_out)
            store_kv(kv_cache, norm(latent), k_pe, batch.slot_mapping, rope=rope_tables)
        else:
            cos, sin = rotary.cos_sin(rope_tables.positions)
            q_pe_out.copy_(rotary.apply(q_pe, cos, sin))
            store_kv(kv_cache, norm(latent), rotary.apply(k_pe, cos, sin), batch.slot_mapping)
        if batch.is_decode:
            out = self._decode(q_nope, q_full, batch, kv_cache)
        else:
            out = self._prefill(torch.cat([q_nope, q_pe], dim=-1), batch, kv_cache)
        return self.o_proj(out.reshape(num_tokens, -1))

    def _project_input(self, x: torch.Tensor, x_fp8=None) -> tuple[torch.Tensor, torch.Tensor]:
        """The two projections of x — q_proj (or q_a_proj) and kv_a_proj_with_mqa — as one GEMM over their
        stacked weights (`stacked.stack_linears`), or two where they cannot stack. `x_fp8 = (values, scales)`:
        x already quantized (for a stacked FP8 weight)."""
        stacked = self.stack_input_projections()
        if stacked is None:
            first = self.q_proj if self.q_lora_rank is None else self.q_a_proj
            return first(x), self.kv_a_proj_with_mqa(x)
        q, kv = stacked(x, x_fp8 if stacked.scale_inv is not None else None).split(stacked.sizes, dim=-1)
        return q, kv

    def input_formats(self, x: torch.Tensor) -> InputFormats:
        """FP8 input projections (stacked) read x quantized."""
        stacked = self.stack_input_projections()
        return InputFormats(fp8=stacked is not None and stacked.scale_inv is not None)

    def stack_input_projections(self) -> Stacked | None:
        """q_proj (or q_a_proj) and kv_a_proj_with_mqa stacked in place (once), or None where they cannot."""
        return stack_linears(
            self, ("q_proj" if self.q_lora_rank is None else "q_a_proj", "kv_a_proj_with_mqa")
        )

    def _kv_b_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """W_UK [H, nope, kv_lora_rank] and W_UV [H, v, kv_lora_rank] out of kv_b_proj. An FP8 kv_b_proj is
        dequantized once for the absorbed path (as DeepSeek's reference does) and kept beside it."""
        w = self.kv_b_proj.weight
        if w.dtype == torch.float8_e4m3fn:
            cached = self.__dict__.get("_kv_b_dequantized")
            if cached is None or cached.device != w.device:
                dtype = self.kv_a_layernorm.weight.dtype
                cached = weight_dequant(w, self.kv_b_proj.weight_scale_inv, dtype)
                self.__dict__["_kv_b_dequantized"] = cached
            w = cached
        w = w.view(self.num_heads, self.qk_nope_head_dim + self.v_head_dim, self.kv_lora_rank)
        return w[:, : self.qk_nope_head_dim], w[:, self.qk_nope_head_dim :]

    def _decode(self, q_nope, q_full, batch: ForwardBatch, kv_cache: torch.Tensor) -> torch.Tensor:
        """q_nope [T, H, nope]; q_full [T, H, kv_lora_rank + rope] (head-major storage) with q_pe already in its
        last columns -> [T, H * v]. Both absorbed GEMMs write their results where the next op reads them."""
        w_uk, w_uv = self._kv_b_weights()
        # q_latent[h] = q_nope[h] @ W_UK[h], straight into q_full's first kv_lora_rank columns
        torch.bmm(q_nope.transpose(0, 1), w_uk, out=q_full.transpose(0, 1)[..., : self.kv_lora_rank])
        # out[h] = attention(latent) @ W_UV[h]^T [T, H, v]: in the merge of a split context, else one bmm
        out, _ = mla_decode(
            q_full, kv_cache, batch.page_table, batch.seq_lens, self.scale, self.kv_lora_rank, w_uv=w_uv
        )
        return out

    def _prefill(self, q: torch.Tensor, batch: ForwardBatch, kv_cache: torch.Tensor) -> torch.Tensor:
        """Expanded attention: each sequence's new rows attend causally to themselves and to every row of its
        cached prefix (`moemesh.kernels.mla_prefill`). K/V come from the latent cache, new rows included."""
        chunk_rows, prefix_rows, prefix_starts = [], [], [0]
        lengths = batch.seq_lens_host or tuple(batch.seq_lens.tolist())  # host ints: no device sync per layer
        for b, length in enumerate(lengths):
            rows = gather_latent(kv_cache, batch.page_table[b], length)  # [L, kv_lora_rank + rope]
            cached = length - batch.query_len(b)
            prefix_rows.append(rows[:cached])
            chunk_rows.append(rows[cached:])
            prefix_starts.append(prefix_starts[-1] + cached)
        k, v = self._expand(torch.cat(chunk_rows).to(q.dtype))
        prefix = None
        if prefix_starts[-1]:
            prefix_k, prefix_v = self._expand(torch.cat(prefix_rows).to(q.dtype))
            prefix = Prefix(prefix_k, prefix_v, _int32_on(prefix_starts, q.device))
        cu_seqlens = _int32_on(batch.query_start, q.device)
        max_seqlen = max(batch.query_len(b) for b in range(batch.num_seqs))
        out, _ = mla_prefill(q.contiguous(), k, v, cu_seqlens, self.scale, max_seqlen, prefix=prefix)
        return out

    def _expand(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Latent cache rows [N, kv_lora_rank + rope] -> per-head k [N, H, nope + rope] and v [N, H, v]."""
        latent, k_pe = rows.split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        kv = self.kv_b_proj(latent).view(rows.shape[0], self.num_heads, -1)
        k_nope, v = kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        k = torch.cat([k_nope, k_pe[:, None, :].expand(-1, self.num_heads, -1)], dim=-1)
        return k, v.contiguous()
