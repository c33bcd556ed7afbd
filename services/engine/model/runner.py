"""ModelRunner: config + weights + KV pool, and one forward per engine step."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from services.engine.model.attention_metadata import AttentionMetadata
from services.engine.model.batch import ForwardBatch
from services.engine.model.config import ModelConfig
from services.engine.model.cpu import CpuFeatures
from services.engine.model.device import resolve_device
from services.engine.model.gguf_weights import load_gguf_weights
from services.engine.model.int8_weights import load_int8_weights
from services.engine.model.kv_cache import KVCache, kv_bytes_per_block, num_blocks_for
from services.engine.model.llama import LlamaModel
from services.engine.model.loader import WeightsError, checkpoint_files, load_weights
from services.engine.model.native import KernelChoice
from services.engine.model.plan import KernelPlan, choose_plan
from services.engine.model.rotary import RotaryTable
from services.engine.model.shapes import padded_token_count
from shared.model_files import gguf_source

log = logging.getLogger(__name__)


class ModelRunner:
    def __init__(
        self,
        model_dir: Path,
        *,
        dtype: str,
        device: str,
        block_size: int,
        num_blocks: int | None,
        kv_cache_bytes: int | None,
        max_model_len: int | None,
        kernels: KernelChoice = "auto",
        kernel_cache_dir: str | Path | None = None,
        cpu: CpuFeatures | None = None,
        quantization: str = "none",
        gguf_file: Path | None = None,
        kv_cache_dtype: str = "auto",
    ) -> None:
        """Load the model and allocate the KV pool: num_blocks if given, else as
        many blocks as fit in kv_cache_bytes. Raises UnsupportedModelError /
        WeightsError / ValueError with a message naming the problem.

        kernels (SCALELLM_KERNELS): "auto" (the native CPU kernels of native.py
        when they build, else plain torch), "torch" or "native".
        kernel_cache_dir (SCALELLM_KERNEL_CACHE_DIR): where compiled kernels are
        kept; None: native.default_cache_dir(). cpu: plan for this CPU instead
        of the one we run on (tests use it to stand in for CPUs they lack).
        quantization (SCALELLM_QUANTIZATION): "auto" (plan.auto_quantization: gguf for a model
        with a GGUF in bf16 on the CPU, else none), "none", or "gguf": the linears computed on
        the Q4_0/Q4_1/Q8_0 blocks of gguf_file (default: the GGUF the folder was made
        from, shared.model_files.gguf_source), when the plan has the kernel for them; or
        "int8": the safetensors matrices quantized at load to int8 per output channel, on the
        same kernel (int8_weights.py). kv_cache_dtype (SCALELLM_KV_CACHE_DTYPE): "auto" (int8 for
        bfloat16 on the native kernels, else the model's dtype; plan.auto_kv_cache_dtype),
        "bfloat16" (a bf16 model's pool unquantized), "int8" (one byte per value and a float32
        scale per token and KV head: ~1.9x bf16's blocks in kv_cache_bytes) or "fp8_e5m2" (one
        byte per value, twice the blocks); the 8-bit formats on the native CPU kernels only (plan.py)."""
        if block_size < 1:
            raise ValueError(f"block_size must be at least 1, got {block_size}")
        self.config = ModelConfig.from_dir(Path(model_dir))
        # Before the plan builds any kernel: a folder without the weights the setting reads is a configuration error.
        gguf_file = self._check_weights_for(quantization, Path(model_dir), gguf_file)
        self.device = resolve_device(device)
        # The one "which kernels" decision; the model, attention metadata and KV pool take it from here.
        self.plan: KernelPlan = choose_plan(
            dtype,
            self.device,
            kernels,
            cpu,
            kernel_cache_dir=kernel_cache_dir,
            quantization=quantization,
            kv_cache_dtype=kv_cache_dtype,
            gguf_available=gguf_file is not None,
        )
        self.dtype = self.plan.dtype
        self.block_size = block_size
        cfg = self.config
        self.max_model_len = self._resolve_max_model_len(max_model_len)
        self._per_block = kv_bytes_per_block(
            num_layers=cfg.num_layers,
            block_size=block_size,
            num_kv_heads=cfg.num_kv_heads,
            head_dim=cfg.head_dim,
            dtype=self.plan.kv_cache_dtype,
        )
        if num_blocks is None:
            if kv_cache_bytes is None:
                raise ValueError("give the KV pool size: num_blocks or kv_cache_bytes")
            num_blocks = num_blocks_for(
                kv_cache_bytes,
                num_layers=cfg.num_layers,
                block_size=block_size,
                num_kv_heads=cfg.num_kv_heads,
                head_dim=cfg.head_dim,
                dtype=self.plan.kv_cache_dtype,
            )
            if num_blocks < 1:
                raise ValueError(
                    f"kv_cache_bytes={kv_cache_bytes} holds no block; one block takes {self._per_block} bytes"
                )
        self.num_blocks = num_blocks
        if self.plan.quantization == "gguf" and gguf_file is not None:
            weights, report = load_gguf_weights(gguf_file, cfg, self.dtype, self.device)
            log.info("weights from %s: %s", gguf_file, report.summary())
        elif self.plan.quantization == "int8":
            weights, int8_report = load_int8_weights(Path(model_dir), cfg, self.dtype, self.device)
            log.info("weights from %s: %s", model_dir, int8_report.summary())
        else:
            weights = load_weights(Path(model_dir), cfg, self.dtype, self.device)
        self.model = LlamaModel(cfg, weights, RotaryTable(cfg, self.max_model_len, self.device), self.plan)
        self.kv_cache = KVCache(
            num_layers=cfg.num_layers,
            num_blocks=num_blocks,
            block_size=block_size,
            num_kv_heads=cfg.num_kv_heads,
            head_dim=cfg.head_dim,
            dtype=self.plan.kv_cache_dtype,
            device=self.device,
            k_dim_major=self.plan.k_dim_major,
        )
        log.info(
            "model %s (%s) on %s: %s; KV pool %d blocks of %d tokens (%.1f MiB)",
            cfg.architecture,
            Path(model_dir).name,
            self.device,
            self.plan.describe(),
            num_blocks,
            block_size,
            num_blocks * self._per_block / 2**20,
        )
        for reason in self.plan.reasons:
            log.info("kernel plan: %s", reason)

    @staticmethod
    def _check_weights_for(quantization: str, model_dir: Path, gguf_file: Path | None) -> Path | None:
        """The GGUF file that gguf (and auto, where there is one) reads, None for the other settings;
        raises when the folder lacks the weights the setting reads."""
        if quantization == "auto":
            return gguf_file or gguf_source(model_dir)
        if quantization == "gguf":
            source = gguf_file or gguf_source(model_dir)
            if source is None:
                raise WeightsError(
                    f"SCALELLM_QUANTIZATION=gguf needs a GGUF file: {model_dir} holds none and is not the "
                    "default model's conversion (SCALELLM_QUANTIZATION=int8 quantizes safetensors weights)"
                )
            return source
        if quantization == "int8":
            try:
                checkpoint_files(model_dir)
            except WeightsError as exc:
                hint = " (SCALELLM_QUANTIZATION=gguf computes on a GGUF's blocks)" if gguf_source(model_dir) else ""
                raise WeightsError(
                    f"SCALELLM_QUANTIZATION=int8 quantizes safetensors weights at load: {exc}{hint}"
                ) from exc
        return None

    def _resolve_max_model_len(self, requested: int | None) -> int:
        cfg = self.config
        limit = cfg.max_position_embeddings
        if requested is not None and requested > limit:
            raise ValueError(f"max_model_len {requested} exceeds the model's max_position_embeddings {limit}")
        length = requested or limit
        if cfg.sliding_window is not None and cfg.sliding_window < length:
            # We attend over the whole context; within the window that is exactly
            # what the model was trained for, beyond it it would not be.
            log.warning("max_model_len capped at the model's sliding window %d", cfg.sliding_window)
            length = cfg.sliding_window
        return length

    def kv_bytes_per_block(self) -> int:
        return self._per_block

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        """Run one step; returns [S, vocab] float32 logits for batch.logits_indices."""
        self._validate(batch)
        device = self.device
        meta = self.attention_metadata(batch)
        return self.model.forward(
            batch.input_ids.to(device, torch.long),
            batch.positions.to(device, torch.long).contiguous(),
            batch.slot_mapping.to(device, torch.long).contiguous(),
            batch.logits_indices.to(device, torch.long),
            meta,
            self.kv_cache,
            padded_rows=self._padded_rows(batch.input_ids.shape[0]),
        )

    def attention_metadata(self, batch: ForwardBatch) -> AttentionMetadata:
        """The step's attention metadata (block tables as index tensors), for this pool and plan."""
        return AttentionMetadata.build(
            slot_mapping=batch.slot_mapping,
            query_lens=batch.query_lens,
            context_lens=batch.context_lens,
            block_tables=batch.block_tables,
            block_size=self.block_size,
            num_kv_heads=self.config.num_kv_heads,
            head_dim=self.config.head_dim,
            device=self.device,
            plan=self.plan,
        )

    def _padded_rows(self, num_tokens: int) -> int:
        # The per-shape caches that padding bounds (shapes.py) are the CPU's; on
        # CUDA the padding would only be extra work.
        # Quantized linears have no per-shape kernels to bound: padding would only be work.
        pad = self.device.type == "cpu" and self.plan.quantized is None
        return padded_token_count(num_tokens) if pad else num_tokens

    def _validate(self, batch: ForwardBatch) -> None:
        """Cheap consistency checks; a malformed batch is an engine bug, so name it clearly."""
        num_tokens = batch.input_ids.shape[0]
        num_seqs = len(batch.query_lens)
        if not (len(batch.context_lens) == len(batch.block_tables) == num_seqs):
            raise ValueError(
                f"ForwardBatch: {num_seqs} query_lens, {len(batch.context_lens)} context_lens, "
                f"{len(batch.block_tables)} block_tables"
            )
        if batch.positions.shape[0] != num_tokens or batch.slot_mapping.shape[0] != num_tokens:
            raise ValueError("ForwardBatch: input_ids, positions and slot_mapping differ in length")
        if sum(batch.query_lens) != num_tokens or num_tokens == 0:
            raise ValueError(f"ForwardBatch: query_lens sum to {sum(batch.query_lens)}, but {num_tokens} tokens given")
        for q_len, ctx, table in zip(batch.query_lens, batch.context_lens, batch.block_tables, strict=True):
            if q_len < 1 or ctx < q_len or ctx > self.max_model_len:
                raise ValueError(f"ForwardBatch: query_len {q_len} / context_len {ctx} is invalid")
            if len(table) * self.block_size < ctx:
                raise ValueError(f"ForwardBatch: {len(table)} blocks cannot hold {ctx} tokens")
