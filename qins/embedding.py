"""QINS token embeddings and a tied output head that reads the same codes.

:class:`ProjectiveEmbedding` replaces an ``nn.Embedding`` ``[vocab, dim]``: its weight is stored as
QINS codes with one log range per token row, or shared tables scaled per row (``per_row=True``), and
a lookup decodes only the rows it reads: it gathers the codes (and logs, or table indices and scales)
of the requested ids and decodes them with :func:`qins.formats.decode_codes`, building the ``[n,
256]`` tables of those ``n`` rows (or the layer's shared ones). The decoded rows equal, bit for bit,
the same rows of :func:`qins.formats.decode_codes` of the whole table.

:class:`ProjectiveTiedHead` is an output projection (``lm_head``) whose weight was tied to an input
embedding: it holds no codes of its own and runs the fused ``qins::linear`` op on the embedding's
``stored``/``sign``/``log_min``/``log_max``, so the codes exist once in memory, in the ``state_dict``
and on disk.
"""
from __future__ import annotations

import torch
from torch import nn

from . import kernels
from .coded import QinsCodedModule, resolve_config
from .encode import encode
from .formats import QinsConfig, decode_codes

__all__ = ["ProjectiveEmbedding", "ProjectiveTiedHead"]


class ProjectiveEmbedding(QinsCodedModule):
    """``nn.Embedding`` with QINS-coded rows: ``forward(ids)`` is ``ŵ[ids]`` in the compute dtype.

    State (all in the ``state_dict``): ``stored`` (uint8 ``[num_embeddings, embedding_dim]``, sign in
    bit 7 when ``config.packed``), ``sign`` (int8, same shape, split format only), ``log_min``/``log_max``
    (float32 ``[num_embeddings]``: one range per token row). 1 byte per weight packed (2 split) plus 8
    bytes per row. No decoded table is ever kept: a call decodes only the rows it reads.

    ``padding_idx`` is kept (normalised to ``[0, num_embeddings)`` as ``nn.Embedding`` does); the codes
    are buffers, so it has no gradient to mask, and a zero padding row decodes to exact zeros. The
    output dtype is the compute dtype (the source weight's, following ``.to(dtype)``/``.half()``); the
    logs always stay float32. ``max_norm`` (which rewrites the weight at lookup) is refused.
    The state_dict records its format in the metadata and a load is validated by
    :func:`qins.state.check_qins_state` before anything changes, as for :class:`qins.ProjectiveLinear`.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        padding_idx: int | None = None,
        *,
        config: QinsConfig | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if num_embeddings <= 0 or embedding_dim <= 0:
            raise ValueError(f"num_embeddings and embedding_dim must be positive, got {num_embeddings}, "
                             f"{embedding_dim}")
        self.config = resolve_config(config)
        if not self.config.per_row:
            raise ValueError("ProjectiveEmbedding needs a per-row config (one log range per token row, decoded alone); "
                             "pass QinsConfig(per_row=True, ...)")
        if padding_idx is not None:
            if not -num_embeddings <= padding_idx < num_embeddings:
                raise ValueError(f"padding_idx must be within [-{num_embeddings}, {num_embeddings}), got {padding_idx}")
            padding_idx = padding_idx % num_embeddings
        if dtype is not None and not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating point dtype, got {dtype}")
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self._register_codes(num_embeddings, embedding_dim, self.config.log_shape(num_embeddings), device, dtype)

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, config: QinsConfig | None = None) -> ProjectiveEmbedding:
        """Encode an ``nn.Embedding`` (any float dtype, any device) in ``config``'s format (per row).

        The source is not modified. The new module is on ``emb``'s device, outputs ``emb.weight.dtype``
        and keeps ``padding_idx``. A meta weight gives a meta module (to be filled by a load). Raises
        ``ValueError`` for ``max_norm``, a per-tensor config, or NaN/±Inf weights; ``TypeError`` for
        anything but an ``nn.Embedding``.
        """
        if not isinstance(emb, nn.Embedding):
            raise TypeError(f"from_embedding expects nn.Embedding, got {type(emb).__name__}")
        if emb.max_norm is not None:
            raise ValueError("nn.Embedding with max_norm rewrites its weight at lookup; QINS codes are fixed, "
                             "renormalise the weight first and pass max_norm=None")
        with torch.no_grad():
            weight = emb.weight
            module = cls(emb.num_embeddings, emb.embedding_dim, emb.padding_idx, config=config,
                         device=weight.device, dtype=weight.dtype)
            if weight.is_meta:
                return module
            module._set_codes(*encode(weight, module.config))
            return module

    @property
    def qins_weight_shape(self) -> tuple[int, int]:
        """``(rows, columns)`` of the coded weight, as :func:`qins.state.check_qins_state` checks it."""
        return self.num_embeddings, self.embedding_dim

    @property
    def weight(self) -> torch.Tensor:
        """The decoded table (:meth:`decode_weight`; 4 bytes per weight in fp32, made on each access)."""
        return self.decode_weight()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows ``ids`` (any shape, int32/int64 in ``[0, num_embeddings)``) -> ``[*ids.shape, dim]``.

        Only the read rows are decoded: ``n = ids.numel()`` rows of codes and logs are gathered and
        ``n`` tables built (the shared tables once, and ``n`` row scales, with ``shared_tables``). No
        ``.item()``, no data-dependent flow: traceable by ``torch.compile``.
        """
        if ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"ProjectiveEmbedding expects int64 or int32 indices, got {ids.dtype}")
        flat = ids.reshape(-1)

        def take(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.index_select(0, flat)

        # the read rows as a small coded weight: per-row logs are per read row, shared tables stay whole
        logs = (self.log_min, self.log_max) if self.row_table is not None else (take(self.log_min), take(self.log_max))
        rows = decode_codes(take(self.stored), take(self.sign), *logs, take(self.row_table), take(self.row_scale),
                            dtype=self.compute_dtype, spacing=self.config.spacing)
        return rows.reshape(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        c = self.config
        return (f"{self.num_embeddings}, {self.embedding_dim}"
                + (f", padding_idx={self.padding_idx}" if self.padding_idx is not None else "")
                + f", format={'packed' if c.packed else 'split'}, spacing={c.spacing}")


class ProjectiveTiedHead(nn.Module):
    """Output projection tied to a :class:`ProjectiveEmbedding`: ``y = x @ ŵᵀ (+ bias)``, ``ŵ`` its codes.

    It keeps a plain reference to the embedding (not a submodule), so the codes appear once in the
    ``state_dict`` (under the embedding's name) and in memory; it always reads the embedding's
    current buffers, after ``.to()`` or a load too. Its own state is the optional ``bias`` Parameter.
    ``forward`` is the fused ``qins::linear`` op (memory-saving: no decoded weight is made); it
    accumulates in float32 and returns ``x.dtype``. ``in_features = embedding_dim``,
    ``out_features = num_embeddings``.
    """

    def __init__(self, embedding: ProjectiveEmbedding, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        if not isinstance(embedding, ProjectiveEmbedding):
            raise TypeError(f"ProjectiveTiedHead ties to a ProjectiveEmbedding, got {type(embedding).__name__}")
        if bias is not None and tuple(bias.shape) != (embedding.num_embeddings,):
            raise ValueError(f"bias must have shape ({embedding.num_embeddings},), got {tuple(bias.shape)}")
        object.__setattr__(self, "_embedding", embedding)  # not registered: no second copy of the codes
        self.in_features, self.out_features = embedding.embedding_dim, embedding.num_embeddings
        if bias is None:
            self.register_parameter("bias", None)
        else:
            self.bias = nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)

    @property
    def embedding(self) -> ProjectiveEmbedding:
        """The embedding whose codes this head reads."""
        return self._embedding

    @property
    def weight(self) -> torch.Tensor:
        """The decoded weight ``[out, in]`` (the embedding's table, decoded now)."""
        return self._embedding.decode_weight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not x.dtype.is_floating_point:
            raise TypeError(f"ProjectiveTiedHead expects a floating-point input, got {x.dtype}")
        e = self._embedding
        return kernels.fused_linear(x, e.stored, e.sign, e.log_min, e.log_max, self.bias, e.config.spacing_id,
                                    e.row_table, e.row_scale)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, tied"
