"""One forward pass for a whole engine iteration on Llama-architecture models: the next
token of every running sequence and the prompts of the newcomers, packed together.

Why: on CPU a decode step over 32 sequences multiplies 32-row matrices, which uses the
cores poorly (32 prompt tokens alone take ~120 ms, a 32-row decode step ~200 ms, a
140-token forward ~190 ms on the 2-core benchmark machine). Every token of the
iteration, decode or prompt, goes through the projections and the MLP as one
``[tokens, hidden]`` matrix, so the weights are read once per iteration and the
matrices are tall; only attention is split: decode rows attend over the batched KV
cache, and each prompt attends causally to itself (packed variable-length batching,
as vLLM does). Numerically it is the model's own computation (same modules, same
rotary embedding, same RMSNorm); only the matrix shapes, and so the rounding, differ.

A prompt may come in chunks (chunked prefill, so a long prompt never stalls the running
rows): a later chunk carries the cache of the chunks before it and attends to it and,
causally, to itself.

Other architectures use the engine's generic path (``model.forward`` per stage).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from common.bottleneck import BottleneckSet

SUPPORTED_MODEL_TYPES = ("llama",)


def base_causal_lm(model: Any) -> Any:
    """The HF causal LM under a peft wrapper (LoRA layers stay injected in it)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def supports_packed(model: Any) -> bool:
    """True when :class:`PackedLlama` computes what ``model.forward`` computes."""
    base = base_causal_lm(model)
    config = getattr(base, "config", None)
    if config is None or getattr(config, "model_type", "") not in SUPPORTED_MODEL_TYPES:
        return False
    if getattr(config, "_attn_implementation", "sdpa") not in ("sdpa", "eager"):
        return False
    if getattr(config, "pretraining_tp", 1) > 1 or getattr(config, "sliding_window", None):
        return False
    inner = getattr(base, "model", None)
    return all(hasattr(inner, a) for a in ("embed_tokens", "layers", "norm", "rotary_emb"))


@dataclass
class PromptChunk:
    """Prompt tokens ``[start, start + len(ids))`` of one sequence. ``cache`` holds the
    keys/values of its tokens before ``start`` (a batch-1 cache that grows in place by
    this chunk); None for a first chunk (``start`` 0). ``virtual``: the input embeddings
    of the chunk's first k positions when they are a prompt-tuning artifact's virtual
    tokens (``[k, hidden]``, replacing the embeddings of their placeholder ids), else None:
    only such rows pay for the override."""

    ids: torch.Tensor  # 1-D
    start: int = 0
    cache: Any = None
    virtual: torch.Tensor | None = None


@dataclass
class PackedOutput:
    """Logits of the last position of every decode row and of every prompt chunk, and the
    keys/values per layer (``[1, kv_heads, chunk_len, head_dim]``) of each first chunk
    (a later chunk's keys/values went into its cache)."""

    decode_logits: torch.Tensor | None  # [rows, vocab]
    prompt_logits: torch.Tensor | None  # [prompts, vocab]
    prompt_kv: list[tuple[list[torch.Tensor], list[torch.Tensor]]]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _project(module: Any, x: torch.Tensor, adapter_names: list[str] | None) -> torch.Tensor:
    # peft LoRA layers take per-row adapter names; rows here are tokens.
    if adapter_names is not None and hasattr(module, "lora_A"):
        return module(x, adapter_names=adapter_names)
    return module(x)


def _bottleneck_groups(
    bottlenecks: list[BottleneckSet | None] | None,
    rows: int,
    lengths: list[int],
    device: Any,
) -> list[tuple[BottleneckSet, torch.Tensor]]:
    """The packed token indices of each bottleneck adapter's rows (decode rows take one
    token each, prompts their chunk's tokens), so each adapter touches its rows only."""
    if not bottlenecks or all(b is None for b in bottlenecks):
        return []
    spans = [(i, 1) for i in range(rows)]
    offset = rows
    for n in lengths:
        spans.append((offset, n))
        offset += n
    by_adapter: dict[int, tuple[BottleneckSet, list[int]]] = {}
    for adapter, (start, n) in zip(bottlenecks, spans, strict=True):
        if adapter is not None:
            by_adapter.setdefault(id(adapter), (adapter, []))[1].extend(range(start, start + n))
    return [
        (adapter, torch.tensor(indices, dtype=torch.long, device=device))
        for adapter, indices in by_adapter.values()
    ]


class PackedLlama:
    """Runs decode rows and prompts of one iteration as one packed forward."""

    def __init__(self, model: Any) -> None:
        base = base_causal_lm(model)
        config = base.config
        self.base = base
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.n_heads
        self.groups = self.n_heads // self.n_kv_heads

    def forward(
        self,
        decode_ids: torch.Tensor | None,
        decode_positions: torch.Tensor | None,
        cache: Any,
        cache_mask: torch.Tensor | None,
        prompts: list[PromptChunk],
        adapter_names: list[str] | None = None,
        bottlenecks: list[BottleneckSet | None] | None = None,
    ) -> PackedOutput:
        """``decode_ids``/``decode_positions``: ``[rows]`` last token and its position per
        running row; ``cache``: their batched KV cache (grows in place by one column);
        ``cache_mask``: ``[rows, columns]`` incl. the new column (1 = real token);
        ``prompts``: the prompt chunks of this iteration; ``adapter_names``: one per
        decode row then one per prompt (peft names), or None when no adapter is loaded;
        ``bottlenecks``: in the same order, each row's bottleneck adapters or None."""
        inner = self.base.model
        device = inner.embed_tokens.weight.device
        lengths = [int(p.ids.shape[0]) for p in prompts]
        id_parts = [p.ids.to(device) for p in prompts]
        position_parts = [
            torch.arange(p.start, p.start + n, device=device)
            for p, n in zip(prompts, lengths, strict=True)
        ]
        rows = 0
        if decode_ids is not None and decode_positions is not None:
            rows = int(decode_ids.shape[0])
            id_parts.insert(0, decode_ids.to(device))
            position_parts.insert(0, decode_positions.to(device))
        ids, positions = torch.cat(id_parts), torch.cat(position_parts)
        token_names: list[str] | None = None
        if adapter_names is not None:
            token_names = list(adapter_names[:rows])
            for name, n in zip(adapter_names[rows:], lengths, strict=True):
                token_names += [name] * n

        groups = _bottleneck_groups(bottlenecks, rows, lengths, device)
        x = inner.embed_tokens(ids)  # [N, hidden]
        offset = rows
        for p, n in zip(prompts, lengths, strict=True):
            if p.virtual is not None:
                x[offset : offset + p.virtual.shape[0]] = p.virtual
            offset += n
        cos, sin = inner.rotary_emb(x[None], position_ids=positions[None])
        cos, sin = cos[0].unsqueeze(1), sin[0].unsqueeze(1)  # [N, 1, head_dim]
        decode_mask = None
        if rows:
            assert cache_mask is not None
            decode_mask = cache_mask.bool()[:, None, None, :]  # [rows, 1, 1, columns]
        starts = []  # first packed index of each prompt
        offset = rows
        for n in lengths:
            starts.append(offset)
            offset += n
        # A later chunk's query i (prompt position start + i) sees keys 0 .. start + i.
        chunk_masks = [
            None
            if p.cache is None
            else torch.arange(p.start + n, device=device)[None, :]
            <= torch.arange(p.start, p.start + n, device=device)[:, None]
            for p, n in zip(prompts, lengths, strict=True)
        ]
        prompt_kv: list[tuple[list[torch.Tensor], list[torch.Tensor]]] = [([], []) for _ in prompts]
        n_tokens = x.shape[0]
        for index, layer in enumerate(inner.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q = _project(attn.q_proj, h, token_names).view(n_tokens, self.n_heads, self.head_dim)
            k = _project(attn.k_proj, h, token_names).view(n_tokens, self.n_kv_heads, self.head_dim)
            v = _project(attn.v_proj, h, token_names).view(n_tokens, self.n_kv_heads, self.head_dim)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            outs = []
            if rows:
                # Each row's query heads grouped by their KV head: [rows, kv_heads, groups, d]
                qd = q[:rows].view(rows, self.n_kv_heads, self.groups, self.head_dim)
                keys, values = cache.layers[index].update(
                    k[:rows].unsqueeze(2), v[:rows].unsqueeze(2)
                )
                od = F.scaled_dot_product_attention(
                    qd, keys, values, attn_mask=decode_mask, scale=attn.scaling
                )
                outs.append(od.reshape(rows, self.n_heads * self.head_dim))
            for j, (start, n) in enumerate(zip(starts, lengths, strict=True)):
                qp = q[start : start + n].transpose(0, 1)[None]  # [1, heads, n, d]
                kp = k[start : start + n].transpose(0, 1)[None].contiguous()
                vp = v[start : start + n].transpose(0, 1)[None].contiguous()
                past = prompts[j].cache
                if past is None:
                    prompt_kv[j][0].append(kp)
                    prompt_kv[j][1].append(vp)
                    op = F.scaled_dot_product_attention(
                        qp, kp, vp, is_causal=True, scale=attn.scaling, enable_gqa=self.groups > 1
                    )
                else:
                    keys_p, values_p = past.layers[index].update(kp, vp)
                    op = F.scaled_dot_product_attention(
                        qp,
                        keys_p,
                        values_p,
                        attn_mask=chunk_masks[j],
                        scale=attn.scaling,
                        enable_gqa=self.groups > 1,
                    )
                outs.append(op[0].transpose(0, 1).reshape(n, self.n_heads * self.head_dim))
            o = outs[0] if len(outs) == 1 else torch.cat(outs)
            attn_out = _project(attn.o_proj, o, token_names)
            for adapter, token_rows in groups:
                adapter.add_to(index, "attention", attn_out, token_rows)
            x = x + attn_out
            h = layer.post_attention_layernorm(x)
            mlp = layer.mlp
            gate = _project(mlp.gate_proj, h, token_names)
            up = _project(mlp.up_proj, h, token_names)
            mlp_out = _project(mlp.down_proj, mlp.act_fn(gate) * up, token_names)
            for adapter, token_rows in groups:
                adapter.add_to(index, "mlp", mlp_out, token_rows)
            x = x + mlp_out

        last = list(range(rows)) + [s + n - 1 for s, n in zip(starts, lengths, strict=True)]
        index_t = torch.tensor(last, dtype=torch.long, device=device)
        logits = _project(self.base.lm_head, inner.norm(x.index_select(0, index_t)), adapter_names)
        return PackedOutput(
            decode_logits=logits[:rows] if rows else None,
            prompt_logits=logits[rows:] if prompts else None,
            prompt_kv=prompt_kv,
        )
