"""The DeepSeek-V2/V3 network, top to bottom. Parameter names follow the Hugging Face checkpoints
(`model.layers.N.self_attn.kv_b_proj.weight`), except that routed experts are stacked per layer."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn

from moemesh.kernels import NormOutputs
from moemesh.model.attention import MLAttention
from moemesh.model.batch import ForwardBatch
from moemesh.model.config import ModelConfig
from moemesh.model.layers import MLP, RMSNorm
from moemesh.model.moe import DeferredExpertBackend, MoE
from moemesh.model.rope import RotaryEmbedding


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = MLAttention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = (
            MoE(config, layer_idx)
            if config.is_moe_layer(layer_idx)
            else MLP(config.hidden_size, config.intermediate_size)
        )

    def forward(self, x, residual, batch, kv_cache, rotary, rope_tables, kv_written=None):
        """The residual stream rides beside the layer output: (x, residual) -> (mlp output, residual), with
        each `residual + x` fused into the next norm. kv_written(): called once the attention wrote this
        layer's KV (its launches issued), before the MLP."""
        normed = self._attend(x, residual, batch, kv_cache, rotary, rope_tables)
        if kv_written is not None:
            kv_written()
        return self.mlp(normed.y, normed), normed.residual

    def attend(self, x, residual, batch, kv_cache, rotary, rope_tables):
        """Everything before the MLP: (x, residual) -> (the MLP's input, residual)."""
        normed = self._attend(x, residual, batch, kv_cache, rotary, rope_tables)
        return normed.y, normed.residual

    def _attend(self, x, residual, batch, kv_cache, rotary, rope_tables) -> NormOutputs:
        """Each norm also writes its output in the forms the next block reads (fp32, FP8: `input_formats`),
        so that block does not convert it in a launch of its own."""
        formats = self.self_attn.input_formats(x)
        normed = self.input_layernorm.outputs(x, residual, fp32=formats.fp32, fp8=formats.fp8)
        residual = x if residual is None else normed.residual
        x = self.self_attn(normed.y, batch, kv_cache, rotary, rope_tables, normed)
        formats = self.mlp.input_formats(x)
        return self.post_attention_layernorm.outputs(x, residual, fp32=formats.fp32, fp8=formats.fp8)


class Backbone(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class DeepseekForCausalLM(nn.Module):
    """forward(batch, kv_caches) -> fp32 logits of the rows `batch.logits_rows` (all rows when None)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = Backbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rotary = RotaryEmbedding(config)

    @torch.inference_mode()
    def forward(
        self,
        batch: ForwardBatch,
        kv_caches: list[torch.Tensor],
        kv_written: Callable[[int], None] | None = None,
    ) -> torch.Tensor:
        """kv_caches: one tensor per layer, [num_pages, page_size, kv_lora_rank + qk_rope_head_dim].
        kv_written(i): called once layer i's attention wrote its KV (launched, on CUDA), before its MLP — the
        prefill worker's KV export (`engine/kv_export.py`) packs a layer group's pages from there."""
        if len(kv_caches) != len(self.model.layers):
            raise ValueError(f"got {len(kv_caches)} KV caches for {len(self.model.layers)} layers")
        x, residual = self.model.embed_tokens(batch.input_ids), None
        rope_tables = self.rotary.tables(batch.positions)
        for i, (layer, kv_cache) in enumerate(zip(self.model.layers, kv_caches, strict=True)):
            written = None if kv_written is None else functools.partial(kv_written, i)
            x, residual = layer(x, residual, batch, kv_cache, self.rotary, rope_tables, written)
        if batch.logits_rows is not None:
            x, residual = x[batch.logits_rows], residual[batch.logits_rows]
        return self.lm_head(self.model.norm.add_forward(x, residual)[0]).float()

    @torch.inference_mode()
    def forward_pingpong(
        self, batches: list[ForwardBatch], kv_caches: list[torch.Tensor]
    ) -> list[torch.Tensor]:
        """`forward` of several micro-batches (disjoint sequences) interleaved at the MoE layers whose routed
        experts are away (a `DeferredExpertBackend`): while one micro-batch's tokens are at the expert pool,
        the next one runs its attention (MegaScale-Infer's ping-pong). Each micro-batch computes exactly what
        `forward` computes for it alone; returns their logits in order."""
        runs = [self._stages(batch, kv_caches) for batch in batches]
        logits: list[torch.Tensor | None] = [None] * len(runs)
        waiting: list = [None] * len(runs)
        for i, run in enumerate(runs):  # each to its first remote MoE layer (or to its end)
            try:
                waiting[i] = next(run)
            except StopIteration as done:
                logits[i] = done.value
        while any(w is not None for w in waiting):
            for i, run in enumerate(runs):
                if waiting[i] is None:
                    continue
                try:
                    waiting[i] = run.send(waiting[i].result())  # its routed outputs; on to its next MoE layer
                except StopIteration as done:
                    waiting[i], logits[i] = None, done.value
        return logits

    def _stages(self, batch: ForwardBatch, kv_caches: list[torch.Tensor]):
        """`forward` as a generator: yields a PendingExperts at each MoE layer whose experts are away, is sent
        the routed output back, returns the logits."""
        x, residual = self.model.embed_tokens(batch.input_ids), None
        rope_tables = self.rotary.tables(batch.positions)
        for layer, kv_cache in zip(self.model.layers, kv_caches, strict=True):
            x, residual = layer.attend(x, residual, batch, kv_cache, self.rotary, rope_tables)
            mlp = layer.mlp
            if isinstance(mlp, MoE) and isinstance(mlp.expert_backend, DeferredExpertBackend):
                x = yield from mlp.deferred(x)  # yields its PendingExperts, is sent their result
            else:
                x = mlp(x)
        if batch.logits_rows is not None:
            x, residual = x[batch.logits_rows], residual[batch.logits_rows]
        return self.lm_head(self.model.norm.add_forward(x, residual)[0]).float()

    def moe_layers(self):
        return [layer.mlp for layer in self.model.layers if isinstance(layer.mlp, MoE)]
