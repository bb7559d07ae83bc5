"""The co-located LenVM: a second SGLang ModelRunner in the scheduler process.

Built the way SGLang builds its STANDALONE/EAGLE draft model: a `ModelRunner` with
`is_draft_worker=True`, sharing the base model's `req_to_token_pool` and token-slot allocator,
with a KV pool of its own of the same size. Every slot the base model writes for a LenVM
request, the LenVM writes too (in the same step), so its cache mirrors the radix cache slot for
slot and a prefix hit is a LenVM hit as well.

Two kinds of LenVM forward, both run here:
- `mirror_extend`: after a base-model prefill (EXTEND) forward, the same tokens into the same
  slots, reusing the base model's ForwardBatch and SGLang's stock attention backend.
- `star`: one forward over all guided requests' star trees (see star_attention.py), which in
  decode steps also writes the root token's KV, i.e. does the mirror for decode. With
  one-pass scoring the trees are roots only, and `candidate_values` scores the candidates from
  the roots' hidden states (value_head.CandidateHead).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import time
from typing import List, Optional

import torch

from sglang_lenvm.checkpoint import inspect_checkpoint
from sglang_lenvm.config import LenVMConfig, resolve_gamma
from sglang_lenvm.runtime import repeat_guard, sentence_end
from sglang_lenvm.runtime.star_attention import StarAttentionBackend, StarMeta
from sglang_lenvm.runtime.tensor_parallel import Agreement

logger = logging.getLogger(__name__)


class LenVMWorker:
    def __init__(self, config: LenVMConfig, scheduler):
        from sglang.srt.configs.model_config import ModelConfig
        from sglang.srt.model_executor.model_runner import ModelRunner

        self.config = config
        ckpt = inspect_checkpoint(config.lenvm_path)
        self.gamma = resolve_gamma(config.gamma, ckpt.gamma)
        target = scheduler.tp_worker.model_runner
        self.target = target
        server_args = scheduler.server_args
        self.model_config = ModelConfig(
            model_path=config.lenvm_path,
            model_override_args=json.dumps({"architectures": [ckpt.lenvm_architecture]}),
            is_draft_model=True,
            dtype=server_args.dtype,
            context_length=target.model_config.context_len,
            trust_remote_code=server_args.trust_remote_code,
        )
        tic = time.perf_counter()
        self.runner = ModelRunner(
            model_config=self.model_config,
            mem_fraction_static=target.mem_fraction_static,
            gpu_id=target.gpu_id,
            nccl_port=scheduler.nccl_port,
            server_args=server_args,
            is_draft_worker=True,
            draft_attention_backend="torch_native" if target.device == "cpu" else None,
        )
        self.model = self.runner.model
        self.device = target.device
        # Token ids at or past the LenVM's embedding (a base model's padding rows beyond its
        # tokenizer; start-up refuses a LenVM smaller than the tokenizer) are never candidates,
        # never sampled by a row that uses the LenVM (its next star forward would have to read
        # them: value-only rows included), and refused in prompts at admission.
        lenvm_vocab = self.model_config.vocab_size
        self.candidate_vocab = lenvm_vocab if lenvm_vocab < target.model_config.vocab_size else None
        # Triton kernels on GPU; plain torch on CPU (the same math, see tests/test_kernel_*).
        # SGLANG_LENVM_KERNELS=triton forces the kernels, e.g. on CPU under TRITON_INTERPRET=1
        # to test the wiring end to end; =torch forces the torch path.
        choice = os.environ.get("SGLANG_LENVM_KERNELS", "auto")
        self.use_kernels = choice == "triton" or (choice == "auto" and self.device != "cpu")
        # How the repetition guard reads tokens (repeat_guard.TokenClasses).
        self.token_classes = None
        if config.repeat_ngram:
            self.token_classes = repeat_guard.token_classes(
                getattr(scheduler, "tokenizer", None), target.model_config.vocab_size,
                self.device)
        # Which tokens end a sentence (sentence_end.py), or None with --lenvm-sentence-end off.
        self.sentence_ends = None
        if config.sentence_end == "on":
            self.sentence_ends = sentence_end.sentence_ends(
                getattr(scheduler, "tokenizer", None), target.model_config.vocab_size,
                self.device)
        self.star_backend: Optional[StarAttentionBackend] = None
        self.max_running_requests = server_args.max_running_requests  # None: SGLang's choice
        # Counters for /lenvm/stats (host ints: no device sync to maintain them).
        self.stats = {"mirror_extend_tokens": 0, "mirror_extend_forwards": 0,
                      "star_forwards": 0, "star_rows": 0, "star_tokens": 0,
                      "candidates_scored": 0}
        self.metrics = None  # runtime/metrics.LenVMMetrics with --enable-metrics
        self.tp = Agreement.current()  # keeps TP ranks in step (a no-op at tp 1)
        self.candidate_head = self._load_candidate_head(ckpt.hidden_size)
        # "star" or "one-pass" (config.SCORINGS)
        self.scoring = config.resolved_scoring(self.candidate_head is not None)
        if self.scoring == "star":
            self.candidate_head = None
        # Shared trunk (one-pass only): the LenVM's layers below `trunk` are the base model's
        # own, so the LenVM starts at layer `trunk` from the base model's residual stream at
        # that layer's input (captured by hooks._capture_trunk as forward_batch.lenvm_trunk),
        # and keeps KV for its own layers only. Star trees would need the shared layers for
        # their candidates, so the trunk is used with one-pass scoring alone.
        self.trunk = config.trunk_layers if self.scoring == "one-pass" else 0
        self.trunk_layer = None  # the base model's decoder layer whose input is captured
        if self.trunk:
            self.model.model.start_layer = self.trunk
            self.trunk_layer = target.model.model.layers[self.trunk]
        logger.info("LenVM %s loaded in %.2fs (gamma=%s)", config.lenvm_path,
                    time.perf_counter() - tic, self.gamma)

    def _load_candidate_head(self, hidden: int):
        from sglang_lenvm.checkpoint import load_candidate_head_tensors
        from sglang_lenvm.value_head import CandidateHead

        tensors = load_candidate_head_tensors(self.config.lenvm_path, hidden)
        if tensors is None:
            return None
        head = CandidateHead(hidden)
        head.load_state_dict({k[len("c_head."):]: v.float() for k, v in tensors.items()})
        return head.to(self.device).eval()

    # ---- construction steps, called from the scheduler's init hooks ----

    def kv_bytes_per_token(self) -> int:
        mc = self.model_config
        itemsize = torch.empty((), dtype=self.runner.kv_cache_dtype).element_size()
        return 2 * self.kv_layers() * self.kv_heads() * mc.head_dim * itemsize

    def workspace_bytes(self) -> int:
        """An upper estimate of the scorer's peak memory in one step at --lenvm-max-star-tokens:
        the star forward's live activations (per token: the residual stream, attention q/k/v/o
        and the MLP's gate/up/product, in the model dtype; the value head in float32) and the
        candidate selection's [rows, V] temporaries (a float32 copy of the rows' logits; on the
        torch path also probabilities, sorted values and int64 indices), rows = the tokens or
        --max-running-requests, whichever is fewer. Charged to SGLang's KV budget at start
        (hooks._charge_kv_budget) so that a full batch cannot run out of memory. The torch
        attention of the CPU path also holds [tokens, heads, prefix] scores, in RAM."""
        hf = self.model_config.hf_config
        H, inter = hf.hidden_size, getattr(hf, "intermediate_size", 4 * hf.hidden_size)
        act = torch.empty((), dtype=self.model_config.dtype).element_size()
        tokens = self.config.max_star_tokens
        rows = min(tokens, self.max_running_requests or tokens)
        per_token = (6 * H + 3 * inter) * act + 2 * H * 4
        per_row = self.target.model_config.vocab_size * (8 if self.use_kernels else 20)
        return tokens * per_token + rows * per_row

    def kv_layers(self) -> int:
        """Decoder layers the LenVM keeps KV for: all but the shared trunk."""
        return self.model_config.num_hidden_layers - self.trunk

    def kv_heads(self) -> int:
        """KV heads on this rank: the LenVM is sharded over the base model's TP group."""
        from sglang.srt.runtime_context import get_parallel

        return self.model_config.get_num_kv_heads(get_parallel().tp_size)

    def attach_pools(self):
        """Share the base model's slot table and allocator; own a KV pool of the same size."""
        from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

        t, r, mc = self.target, self.runner, self.model_config
        if t.page_size != 1:
            raise ValueError("sglang-lenvm supports --page-size 1 only")
        r.req_to_token_pool = t.req_to_token_pool
        r.token_to_kv_pool_allocator = t.token_to_kv_pool_allocator
        r.max_total_num_tokens = t.max_total_num_tokens
        r.max_running_requests = t.max_running_requests
        r.memory_pool_config = t.memory_pool_config
        r.token_to_kv_pool = MHATokenToKVPool(
            t.max_total_num_tokens,
            page_size=t.page_size,
            dtype=r.kv_cache_dtype,
            head_num=self.kv_heads(),
            head_dim=mc.head_dim,
            layer_num=self.kv_layers(),
            device=self.device,
            enable_memory_saver=False,
            start_layer=self.trunk,
            end_layer=mc.num_hidden_layers - 1,
        )
        r._init_post_memory_pool_components()
        logger.info("LenVM KV pool: %d tokens, %.1f MB", t.max_total_num_tokens,
                    t.max_total_num_tokens * self.kv_bytes_per_token() / 2**20)

    def init_attention(self):
        self.runner.init_attention_backends()
        self.star_backend = StarAttentionBackend(
            self.runner.token_to_kv_pool, self.runner.req_to_token_pool,
            use_triton=self.use_kernels)

    # ---- forwards ----

    @torch.no_grad()
    def mirror_extend(self, forward_batch, rows: Optional[List[int]] = None) -> torch.Tensor:
        """Run some rows of the base model's prefill batch through the LenVM, into the same KV
        slots (all rows when `rows` is None).

        Returns the final-norm hidden state at each mirrored row's last new token
        ([len(rows), H]); `v_head` of it is the state's raw value z.
        """
        from sglang.srt.model_executor.forward_context import ForwardContext, forward_context

        fb = extend_rows(forward_batch, rows, getattr(self.runner, "kv_index_translator", None))
        backend = self.runner.attn_backend
        with forward_context(ForwardContext(attn_backend=backend), forward_batch=fb):
            backend.init_forward_metadata(fb)
            hidden = self.model.hidden_states(fb.input_ids, fb.positions, fb,
                                              input_embeds=self.trunk_input(fb))
        last = torch.cumsum(fb.extend_seq_lens, 0) - 1
        self.stats["mirror_extend_forwards"] += 1
        self.stats["mirror_extend_tokens"] += int(fb.input_ids.shape[0])
        return hidden[last]

    @torch.no_grad()
    def candidate_values(self, hidden: torch.Tensor, cand_ids: torch.Tensor) -> torch.Tensor:
        """One-pass scoring: raw values z [B, K] of the candidates `cand_ids` [B, K] after the
        states whose final hidden states are `hidden` [B, H] (the candidate head)."""
        B, K = cand_ids.shape
        embeds = self.model.model.embed_tokens(cand_ids.reshape(-1)).view(B, K, -1)
        self.stats["candidates_scored"] += B * K
        return self.candidate_head(hidden, embeds)

    def trunk_input(self, fb) -> Optional[torch.Tensor]:
        """With a shared trunk: the base model's residual stream at the LenVM's first own
        layer, for the batch's tokens (captured during the base forward)."""
        if not self.trunk:
            return None
        stream = getattr(fb, "lenvm_trunk", None)
        if stream is None:
            raise RuntimeError("the base model's residual stream was not captured this step")
        return stream

    @torch.no_grad()
    def star(self, tokens: torch.Tensor, positions: torch.Tensor, meta: StarMeta,
             input_embeds: Optional[torch.Tensor] = None) -> torch.Tensor:
        """One LenVM forward over B star trees of T tokens each: raw values z [B, T] (0 at
        the positions a packed tree does not compute)."""
        B, T = meta.prefix_lens.shape[0], meta.tree_size
        z = self.model.v_head(self.star_hidden(tokens, positions, meta, input_embeds))
        return meta.unpack(z.view(-1)).view(B, T)

    @torch.no_grad()
    def star_hidden(self, tokens: torch.Tensor, positions: torch.Tensor, meta: StarMeta,
                    input_embeds: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The backbone part of `star`: final-norm hidden states [N, H] of the N tokens
        [N] (B * T, or meta.packed's positions of them). `input_embeds` [N, H]: the trunk's
        stream instead of token embeddings (shared trunk, roots only)."""
        from sglang.srt.model_executor.forward_batch_info import ForwardBatch, ForwardMode
        from sglang.srt.model_executor.forward_context import ForwardContext, forward_context

        B, T = meta.prefix_lens.shape[0], meta.tree_size
        flat = tokens.reshape(-1)
        fb = ForwardBatch(
            forward_mode=ForwardMode.EXTEND,
            batch_size=B,
            input_ids=flat,
            req_pool_indices=meta.req_pool_indices,
            seq_lens=meta.prefix_lens + T,
            out_cache_loc=meta.root_slots if meta.root_slots is not None else flat,
            seq_lens_sum=0,
            positions=positions.reshape(-1),
        )
        self.star_backend.meta = meta
        try:
            with forward_context(ForwardContext(attn_backend=self.star_backend)):
                hidden = self.model.hidden_states(flat, fb.positions, fb,
                                                  input_embeds=input_embeds)
        finally:
            self.star_backend.meta = None
        self.stats["star_forwards"] += 1
        self.stats["star_rows"] += B
        self.stats["star_tokens"] += flat.shape[0]
        self.stats["candidates_scored"] += flat.shape[0] - B * int(meta.has_root)
        return hidden


# ForwardBatch fields with one entry per request, and per token, that a row subset indexes.
_PER_ROW = ("req_pool_indices", "seq_lens", "orig_seq_lens", "extend_prefix_lens",
            "extend_seq_lens", "encoder_lens", "seq_lens_cpu", "req_pool_indices_cpu",
            "extend_prefix_lens_cpu", "extend_seq_lens_cpu", "extend_logprob_start_lens_cpu",
            "rids", "lora_ids", "mm_inputs", "top_logprobs_nums", "token_ids_logprobs",
            "encoder_lens_cpu", "encoder_cached", "multi_item_delimiter_indices",
            "token_indices_to_pool")
_PER_TOKEN = ("input_ids", "positions", "out_cache_loc", "input_embeds", "lenvm_trunk")


def extend_rows(fb, rows: Optional[List[int]], translator=None):
    """An EXTEND ForwardBatch restricted to some rows: same slots, same positions.

    A shallow copy with the per-request and per-token fields indexed and the sums recomputed;
    the attention backend then plans for these rows alone. Its KV location plan is the
    LenVM runner's own (`translator`), over the rows' virtual slot ids, as SGLang's
    ForwardBatch.init_new plans a lone forward.
    """
    fb = copy.copy(fb)
    n = fb.batch_size
    if rows is None or list(rows) == list(range(n)):
        return fb
    seq = list(fb.extend_seq_lens_cpu)
    starts = [0]
    for k in seq:
        starts.append(starts[-1] + k)
    token_idx = [t for i in rows for t in range(starts[i], starts[i] + seq[i])]
    device = fb.input_ids.device
    tok = torch.tensor(token_idx, dtype=torch.int64).to(device, non_blocking=True)
    row_t = torch.tensor(rows, dtype=torch.int64)
    for name in _PER_ROW:
        value = getattr(fb, name, None)
        if value is None:
            continue
        if isinstance(value, torch.Tensor):
            setattr(fb, name, value[row_t.to(value.device, non_blocking=True)])
        else:
            setattr(fb, name, [value[i] for i in rows])
    virtual = getattr(fb, "out_cache_loc_virtual", None)
    if virtual is not None:  # the write window in the scheduler's ids, before translation
        fb.out_cache_loc = virtual
    for name in _PER_TOKEN:
        value = getattr(fb, name, None)
        if isinstance(value, torch.Tensor):
            setattr(fb, name, value[tok.to(value.device, non_blocking=True)])
    sub_seq = [seq[i] for i in rows]
    fb.batch_size = len(rows)
    fb.extend_num_tokens = sum(sub_seq)
    dtype = fb.extend_start_loc.dtype if fb.extend_start_loc is not None else torch.int64
    fb.extend_start_loc = torch.tensor([0] + sub_seq[:-1], dtype=torch.int64).cumsum(0).to(
        device=device, dtype=dtype, non_blocking=True)
    if fb.seq_lens_cpu is not None:
        fb.seq_lens_sum = int(fb.seq_lens_cpu.sum())
    fb.kv_loc_plan = fb.kv_loc_cols = fb.out_cache_loc_virtual = None
    fb.out_cache_loc_is_physical = False
    if translator is not None:
        translator.own_plan(fb).bind(fb, translator)
    return fb
