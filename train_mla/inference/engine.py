"""Generation engine for MLA checkpoints and their Llama (GQA) sources, so that both are measured like for like.

* prefill ("MHA mode"): the model's own attention modules run over the right-padded prompts (SDPA or flash,
  causal), and write what they would cache into a preallocated cache instead of a growing one;
* decode: one token per sequence per step over that cache. MLA layers attend in the absorbed "MQA mode" directly
  over the latent rows [c_kv | k_pe] (FlashMLA's layout); GQA layers over a K/V cache. Both use the split-KV
  kernel of `decode_attention.py`, so each step reads every cached entry once;
* a decode layer is a few matrix products with everything else between them fused: the projections that read the
  same input are one matrix (MLA: q_a | kv_a, GQA: q | k | v, MLP: gate | up; the model's own weights become views
  of it, so nothing is stored twice), and where it costs at most `FOLD_LIMIT` times the weights it replaces the
  latent absorption is folded into the weights once (W_uk into the query projection, W_uv into o_proj);
* on CUDA a decode step of a given batch size is captured once as a CUDA graph and replayed; with `compile=True`
  each layer is compiled by `torch.compile`, which fuses the norms, RoPE, the cache write and the residual adds
  into the few kernels between the matrix products (the attention kernel is one opaque operator to it).

Sequences of one batch may have different prompt lengths; each has its own position and length. The cache is
per layer: MLA [slots, T, r + d_r], GQA K and V [slots, T, K, d]; its bytes per token equal
`kv_cache_size.kv_elements_per_layer` times the element size, which the tests check on the allocated tensors.
The engine reads the model's weights when it is built: a model changed afterwards needs a new engine.
"""

import inspect

import torch
import torch.nn.functional as F
from torch import nn

from train_mla.inference.decode_attention import cached_decode_attention, triton_kernels, use_triton
from train_mla.model.mla_attention import MLAAttention, apply_rope

FOLD_LIMIT = 1.5  # fold the absorption into a weight when the folded weight has at most 1.5x the elements it replaces


def _at_least_fp32(logits):
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


@torch.no_grad()
def merge_rows(*parts):
    """One weight [sum of rows, in] (and bias, or None) from Linear modules or (weight, bias) pairs, in order. Each
    Linear's weight and bias become views of their rows of it (same values, one copy in memory)."""
    pairs = [(p.weight, p.bias) if isinstance(p, nn.Linear) else p for p in parts]
    weight = torch.cat([w for w, _ in pairs])
    bias = None
    if any(b is not None for _, b in pairs):
        bias = torch.cat([b if b is not None else w.new_zeros(w.shape[0]) for w, b in pairs])
    row = 0
    for p, (w, _) in zip(parts, pairs):
        n = w.shape[0]
        if isinstance(p, nn.Linear):
            p.weight.data = weight[row : row + n]
            if p.bias is not None:
                p.bias.data = bias[row : row + n]
        row += n
    return weight, bias


def cache_keyword(attn: nn.Module) -> str:
    """The name under which `attn.forward` takes its cache: `cache` (transformers >= 5.24 and our MLA layer) or
    `past_key_values` (earlier 5.x). Passed under the wrong name the cache would be ignored, silently."""
    params = inspect.signature(attn.forward).parameters
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    raise TypeError(
        f"{type(attn).__name__}.forward takes neither `cache` nor `past_key_values`; the engine cannot "
        "fill its cache during prefill."
    )


class MergedMLP:
    """Llama's MLP with gate_proj and up_proj as one matrix product."""

    def __init__(self, mlp: nn.Module):
        self.mlp, self.width = mlp, mlp.gate_proj.weight.shape[0]
        self.weight, self.bias = merge_rows(mlp.gate_proj, mlp.up_proj)  # [2I, D]

    def __call__(self, x):
        gate, up = F.linear(x, self.weight, self.bias).split(self.width, -1)  # [B, I] x 2
        return self.mlp.down_proj(self.mlp.act_fn(gate) * up)


class LatentCache:
    """Cache of one MLA layer (per token the latent c_kv, r values, then the rotated RoPE key k_pe, d_r) and the
    layer's decode weights."""

    def __init__(self, attn: MLAAttention, slots: int, length: int, dtype, device):
        self.attn, self.slots = attn, None
        H, r, d_n, d_r, d_v = (
            attn.num_heads,
            attn.kv_lora_rank,
            attn.qk_nope_head_dim,
            attn.qk_rope_head_dim,
            attn.v_head_dim,
        )
        # [slots, T, r + d_r]: a row per token (the kernel sees it as one key head; written as whole rows, which the
        # compiled layer does in place: a write into a [.., 1, ..] slice of it was compiled into a copy of the cache)
        self.data = torch.zeros(slots, length, r + d_r, dtype=dtype, device=device)
        self._fold_weights(H, r, d_n, d_r, d_v)

    @torch.no_grad()
    def _fold_weights(self, H, r, d_n, d_r, d_v):
        a = self.attn
        wt = a.kv_b_proj.weight
        exact = torch.promote_types(wt.dtype, torch.float32)  # folded in fp32 (fp64 stays fp64), stored as the weights
        w_kb = wt.view(H, d_n + d_v, r)
        w_uk, w_uv = w_kb[:, :d_n], w_kb[:, d_n:]  # [H, d_n, r] folded into q, [H, d_v, r] into the output
        q_lin = a.q_proj if a.q_lora_rank is None else a.q_b_proj
        w_q = q_lin.weight.view(H, d_n + d_r, -1)  # [H, d_n + d_r, in]
        fold_q = H * (r + d_r) * w_q.shape[-1] <= FOLD_LIMIT * (w_q.numel() + w_uk.numel())
        D = a.o_proj.weight.shape[0]
        fold_o = D * H * r <= FOLD_LIMIT * (D * H * d_v + w_uv.numel())
        if fold_q:  # per head: q_lat = W_uk^T W_q_nope x, so [W_uk^T W_q_nope ; W_q_pe] [H, r + d_r, in]
            q_lat = torch.einsum("hdr,hdi->hri", w_uk.to(exact), w_q[:, :d_n].to(exact)).to(wt.dtype)
            w_q = torch.cat([q_lat, w_q[:, d_n:]], 1).reshape(H * (r + d_r), -1)
        self.w_uk = None if fold_q else w_uk
        if a.q_lora_rank is None:  # the query comes straight from x: one matrix with the latent projection
            self.w_q = None
            self.w_in, self.b_in = merge_rows((w_q, None) if fold_q else q_lin, a.kv_a_proj_with_mqa)
        else:  # [q_a | kv_a] from x, then the (absorbed) q_b from the normed q_a
            self.w_q = w_q if fold_q else q_lin.weight
            self.w_in, self.b_in = merge_rows(a.q_a_proj, a.kv_a_proj_with_mqa)
        if fold_o:  # o_proj(W_uv o_lat) = (W_o W_uv) o_lat: [D, H, d_v] x [H, d_v, r] -> [D, H * r]
            w_o = a.o_proj.weight.view(D, H, d_v).to(exact)
            self.w_o = torch.einsum("dhv,hvr->dhr", w_o, w_uv.to(exact)).reshape(D, H * r).to(wt.dtype)
            self.w_uv = None
        else:
            self.w_o, self.w_uv = None, w_uv

    def tensors(self):
        return [self.data]

    def update(self, c_kv, k_pe, layer_idx, **_):
        """Called by `MLAAttention.forward` during prefill: c_kv [n, 1, L, r], k_pe [n, 1, L, d_r]."""
        L = c_kv.shape[2]
        self.data[self.slots, :L] = torch.cat([c_kv, k_pe], -1)[:, 0].to(self.data.dtype)
        return c_kv, k_pe

    def decode(self, x, cos, sin, positions, backend):
        """x [B, D] (normed hidden state of the new tokens), cos/sin [B, d_r], positions [B] -> attention output
        [B, D]. Writes the new tokens' rows at `positions` first."""
        a = self.attn
        B, H, r, d_n, d_r = x.shape[0], a.num_heads, a.kv_lora_rank, a.qk_nope_head_dim, a.qk_rope_head_dim
        q_width = self.w_in.shape[0] - r - d_r  # q_a, or the (absorbed) full-rank query
        q, c_kv, k_pe = F.linear(x, self.w_in, self.b_in).split([q_width, r, d_r], -1)  # [B, q_width], [B, r], [B, d_r]
        if self.w_q is not None:
            q = F.linear(a.q_a_layernorm(q), self.w_q)
        q = q.view(B, H, -1)  # [B, H, r + d_r] absorbed, or [B, H, d_n + d_r]
        if self.w_uk is None:
            q_lat, q_pe = q.split([r, d_r], -1)
        else:
            q_nope, q_pe = q.split([d_n, d_r], -1)
            q_lat = torch.einsum("bhd,hdr->bhr", q_nope, self.w_uk)  # [B, H, r]
        cos, sin = cos[:, None], sin[:, None]  # [B, 1, d_r]
        q_pe = apply_rope(q_pe[:, :, None], cos, sin, a.config.rope_interleave)[:, :, 0]  # [B, H, d_r]
        k_pe = apply_rope(k_pe[:, None, None], cos, sin, a.config.rope_interleave)[:, 0, 0]  # [B, d_r]
        row = torch.cat([a.kv_a_layernorm(c_kv), k_pe], -1)  # [B, r + d_r]
        self.data[torch.arange(B, device=x.device), positions] = row.to(self.data.dtype)
        q_abs = torch.cat([q_lat, q_pe], -1)[:, None].to(self.data.dtype)  # [B, 1, H, r + d_r]: one key head
        o_lat = cached_decode_attention(q_abs, self.data, None, positions + 1, a.scaling, r, backend)  # [B, 1, H, r]
        if self.w_o is not None:
            return F.linear(o_lat.reshape(B, H * r).to(self.w_o.dtype), self.w_o, a.o_proj.bias)
        out = torch.einsum("bhr,hvr->bhv", o_lat[:, 0].to(self.w_uv.dtype), self.w_uv)  # [B, H, d_v]
        return a.o_proj(out.reshape(B, -1))


class KVCache:
    """Cache of one GQA (Llama) layer: rotated keys and values, [slots, T, K, d] each; q | k | v as one matrix."""

    def __init__(self, attn: nn.Module, slots: int, length: int, dtype, device):
        K, d = attn.config.num_key_value_heads, attn.head_dim
        self.attn, self.slots, self.kv_heads = attn, None, K
        self.k = torch.zeros(slots, length, K, d, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.w_qkv, self.b_qkv = merge_rows(attn.q_proj, attn.k_proj, attn.v_proj)  # [(H + 2K) d, D]

    def tensors(self):
        return [self.k, self.v]

    def update(self, k, v, layer_idx, **_):
        """Called by `LlamaAttention.forward` during prefill: k, v [n, K, L, d]."""
        L = k.shape[2]
        self.k[self.slots, :L] = k.transpose(1, 2).to(self.k.dtype)
        self.v[self.slots, :L] = v.transpose(1, 2).to(self.v.dtype)
        return k, v

    def decode(self, x, cos, sin, positions, backend):
        """x [B, D], cos/sin [B, d] (Llama's full-head RoPE), positions [B] -> attention output [B, D]; writes the new
        keys and values at `positions` first."""
        a = self.attn
        B, d, K = x.shape[0], a.head_dim, self.kv_heads
        H = a.config.num_attention_heads
        q, k, v = F.linear(x, self.w_qkv, self.b_qkv).split([H * d, K * d, K * d], -1)
        cos, sin = cos[:, None], sin[:, None]  # [B, 1, d]
        q = apply_rope(q.view(B, H, 1, d), cos, sin, False).view(B, K, H // K, d)  # query heads by key head
        k = apply_rope(k.view(B, K, 1, d), cos, sin, False)[:, :, 0]  # [B, K, d]
        rows = torch.arange(B, device=x.device)
        self.k[rows, positions] = k.to(self.k.dtype)
        self.v[rows, positions] = v.view(B, K, d).to(self.v.dtype)
        out = cached_decode_attention(q.to(self.k.dtype), self.k, self.v, positions + 1, a.scaling, d, backend)
        return a.o_proj(out.reshape(B, -1).to(a.o_proj.weight.dtype))  # out [B, K, G, d]


class Engine:
    """Batched generation over a preallocated cache of `max_batch_size` sequences of `max_seq_len` tokens.

    attention_backend: "auto" (Triton's kernels on CUDA, the PyTorch reference elsewhere), "triton", "torch", or
    "tilelang" (MLA layers by the TileLang kernel of tilelang_decode.py, Hopper only; GQA layers by Triton's)."""

    def __init__(
        self,
        model,
        max_batch_size: int,
        max_seq_len: int,
        cache_dtype=None,
        cuda_graphs: bool | None = None,
        compile: bool = False,
        attention_backend: str = "auto",
        prefill_tokens: int = 65536,
    ):
        self.model = model.eval()
        self.config = model.config
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        cache_dtype = cache_dtype or p.dtype
        self.max_batch_size, self.max_seq_len, self.prefill_tokens = max_batch_size, max_seq_len, prefill_tokens
        if attention_backend == "auto":  # resolved once here: nothing in a decode step may sync with the host
            attention_backend = "triton" if use_triton(self.device) else "torch"
        if attention_backend in ("triton", "tilelang"):
            triton_kernels()  # import (and define) the kernels outside any torch.compile trace
        if attention_backend == "tilelang":
            from train_mla.inference import tilelang_decode

            if not tilelang_decode.available():
                raise ValueError("attention_backend 'tilelang' needs TileLang (the [tilelang] extra) and a Hopper GPU")
            for i, layer in enumerate(model.model.layers):
                a = layer.self_attn
                if isinstance(a, MLAAttention) and not tilelang_decode.supported(a.kv_lora_rank, a.qk_rope_head_dim):
                    raise ValueError(
                        f"attention_backend 'tilelang': layer {i}'s latent {a.kv_lora_rank} + RoPE "
                        f"{a.qk_rope_head_dim} is not a width the kernel takes (multiples of 16 and 8)"
                    )
        self.backend = attention_backend
        self.layers = model.model.layers
        self.caches = [
            (LatentCache if isinstance(layer.self_attn, MLAAttention) else KVCache)(
                layer.self_attn, max_batch_size, max_seq_len, cache_dtype, self.device
            )
            for layer in self.layers
        ]
        positions = torch.arange(max_seq_len, device=self.device)[None]  # RoPE tables, from the model's own modules
        probe = torch.zeros(1, device=self.device, dtype=self.dtype)
        with torch.no_grad():
            self.gqa_rope = [t[0] for t in model.model.rotary_emb(probe, positions)]  # [T, head_dim] x 2
            mla = next((c.attn for c in self.caches if isinstance(c, LatentCache)), None)
            self.mla_rope = [t[0] for t in mla.rotary_emb(probe, positions)] if mla is not None else None
        self.cuda_graphs = self.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        if self.cuda_graphs and self.device.type != "cuda":
            raise ValueError("cuda_graphs=True needs the model on a CUDA device.")
        self.mlps = [MergedMLP(layer.mlp) for layer in self.layers]
        self.cache_keywords = [cache_keyword(layer.self_attn) for layer in self.layers]  # how prefill hands over caches
        # one compiled graph per layer kind and batch size (the attention kernel is an opaque operator in it)
        if compile:
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 4 * len(self.layers))
        self._layer = torch.compile(self._decode_layer, dynamic=False) if compile else self._decode_layer
        self._graphs, self._pool = {}, None

    def cache_bytes_per_token(self) -> int:
        """Bytes of allocated cache per token (all layers), measured from the tensors themselves."""
        total = sum(t.numel() * t.element_size() for c in self.caches for t in c.tensors())
        return total // (self.max_batch_size * self.max_seq_len)

    # -- prefill ---------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, prompts: list[list[int]], slots: list[int]) -> torch.Tensor:
        """Run the prompts through the model, filling cache rows `slots`; returns next-token logits [n, V] (fp32)."""
        out, group = [], []
        for i in range(len(prompts)):  # groups of at most `prefill_tokens` padded tokens bound the activations
            if group and (len(group) + 1) * max(len(prompts[j]) for j in group + [i]) > self.prefill_tokens:
                out.append(self._prefill_group([prompts[j] for j in group], [slots[j] for j in group]))
                group = []
            group.append(i)
        out.append(self._prefill_group([prompts[j] for j in group], [slots[j] for j in group]))
        return torch.cat(out)

    def _prefill_group(self, prompts, slots):
        n, L = len(prompts), max(len(p) for p in prompts)
        ids = torch.zeros(n, L, dtype=torch.long, device=self.device)
        for i, p in enumerate(prompts):  # right padding: a real token never attends to a padded one
            ids[i, : len(p)] = torch.tensor(p, device=self.device)
        lengths = torch.tensor([len(p) for p in prompts], device=self.device)
        h = self.model.model.embed_tokens(ids)  # [n, L, D]
        position_ids = torch.arange(L, device=self.device)[None].expand(n, L)
        rope = (self.gqa_rope[0][:L][None].expand(n, L, -1), self.gqa_rope[1][:L][None].expand(n, L, -1))
        mask = None  # SDPA / flash: causal by flag
        if self.config._attn_implementation == "eager":
            mask = torch.full((L, L), torch.finfo(self.dtype).min, device=self.device, dtype=self.dtype).triu(1)[
                None, None
            ]
        slots = torch.tensor(slots, device=self.device)
        for layer, cache, keyword in zip(self.layers, self.caches, self.cache_keywords):
            cache.slots = slots
            a, _ = layer.self_attn(
                layer.input_layernorm(h),
                position_embeddings=rope,
                attention_mask=mask,
                position_ids=position_ids,
                **{keyword: cache},
            )
            h = h + a
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        last = h[torch.arange(n, device=self.device), lengths - 1]  # [n, D]
        return _at_least_fp32(self.model.lm_head(self.model.model.norm(last)))

    # -- decode ----------------------------------------------------------------------------------------------------
    @staticmethod
    def _decode_layer(cache, layer, mlp, h, m, cos, sin, positions, backend):
        """One decoder layer of a decode step: h [B, D] and the MLP output m [B, D] of the layer before, added here so
        that the residual add and this layer's norm are one kernel -> (h, this layer's MLP output)."""
        h = h + m
        h = h + cache.decode(layer.input_layernorm(h), cos, sin, positions, backend)
        return h, mlp(layer.post_attention_layernorm(h))

    def step(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """One token per sequence: tokens [B] at positions [B] -> next-token logits [B, V] (fp32)."""
        h = self.model.model.embed_tokens(tokens)  # [B, D]
        m = torch.zeros_like(h)
        g_cos, g_sin = self.gqa_rope[0][positions], self.gqa_rope[1][positions]  # [B, head_dim]
        if self.mla_rope is not None:
            m_cos, m_sin = self.mla_rope[0][positions], self.mla_rope[1][positions]  # [B, d_r]
        for layer, cache, mlp in zip(self.layers, self.caches, self.mlps):
            cos, sin = (m_cos, m_sin) if isinstance(cache, LatentCache) else (g_cos, g_sin)
            h, m = self._layer(cache, layer, mlp, h, m, cos, sin, positions, self.backend)
        return _at_least_fp32(self.model.lm_head(self.model.model.norm(h + m)))

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Write tokens [B] at positions [B] of cache slots 0..B-1 and return the next logits [B, V]."""
        if not self.cuda_graphs:
            return self.step(tokens, positions)
        B = tokens.shape[0]
        if B not in self._graphs:
            self._graphs[B] = self._capture(tokens, positions)
        graph, static_tokens, static_positions, logits = self._graphs[B]
        static_tokens.copy_(tokens)
        static_positions.copy_(positions)
        graph.replay()
        return logits

    def _capture(self, tokens, positions):
        """Warm up (kernel compilation, cuBLAS workspaces), then record one step as a CUDA graph.

        The warm-up steps write the same cache rows the real step writes, with the same values."""
        static_tokens, static_positions = tokens.clone(), positions.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                self.step(static_tokens, static_positions)
        torch.cuda.current_stream().wait_stream(side)
        self._pool = self._pool or torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            logits = self.step(static_tokens, static_positions)
        return graph, static_tokens, static_positions, logits

    # -- generation ------------------------------------------------------------------------------------------------
    @staticmethod
    def sample(logits, temperature: float, top_p: float, generator=None) -> torch.Tensor:
        """Greedy when temperature == 0, else nucleus sampling: logits [B, V] -> tokens [B]."""
        if temperature == 0:
            return logits.argmax(-1)
        probs = (logits / temperature).softmax(-1)
        if top_p >= 1.0:  # the full distribution: no sort (at batch 1,024 x 49k vocab it costs more than the model)
            return torch.multinomial(probs, 1, generator=generator)[:, 0]
        sorted_p, order = probs.sort(-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > top_p  # keep the smallest prefix whose mass reaches top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        pick = torch.multinomial(sorted_p, 1, generator=generator)  # [B, 1]
        return order.gather(-1, pick)[:, 0]

    @torch.inference_mode()
    def generate(
        self,
        prompts: list[list[int]],
        max_new_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        eos_token_id=None,
        seed: int | None = None,
        stream=None,
    ) -> list[list[int]]:
        """New tokens for each prompt, each list ending at (and including) its first EOS.

        `stream(step_tokens)` is called with the [B] token list of every step (for interactive use)."""
        B = len(prompts)
        if not 1 <= B <= self.max_batch_size:
            raise ValueError(f"{B} prompts, but the engine was built for 1..{self.max_batch_size} (max_batch_size).")
        if min(len(p) for p in prompts) == 0:
            raise ValueError("Every prompt needs at least one token.")
        longest = max(len(p) for p in prompts)
        if longest + max_new_tokens > self.max_seq_len:
            raise ValueError(
                f"A prompt of {longest} tokens + max_new_tokens {max_new_tokens} exceeds "
                f"max_seq_len {self.max_seq_len}; build the engine with a larger max_seq_len."
            )
        eos = torch.tensor(
            sorted({eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or [])),
            device=self.device,
            dtype=torch.long,
        )
        generator = torch.Generator(self.device).manual_seed(seed) if seed is not None else None
        logits = self.prefill(prompts, list(range(B)))
        positions = torch.tensor([len(p) for p in prompts], device=self.device)
        done = torch.zeros(B, dtype=torch.bool, device=self.device)
        steps = []
        for i in range(max_new_tokens):
            tokens = self.sample(logits, temperature, top_p, generator)
            steps.append(tokens)
            done |= torch.isin(tokens, eos)
            if stream is not None:
                stream(tokens.tolist())
            last = i == max_new_tokens - 1
            if last or (len(eos) and (i % 8 == 7 or B == 1) and bool(done.all())):  # a host sync every 8 steps
                break
            logits = self.decode(tokens, positions)
            positions = positions + 1
        out = torch.stack(steps, 1).tolist()  # [B, steps]
        stops = set(eos.tolist())
        return [seq[: next((j + 1 for j, t in enumerate(seq) if t in stops), len(seq))] for seq in out]
