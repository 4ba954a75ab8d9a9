"""Prompt-to-prompt attention control through diffusers attention processors.

The denoising batch is ``[uncond x B, cond x B]`` with B = 1 + branches: element 0 of each half is
the source branch, the others edit branches. Control touches only the conditional half: each
branch's cross-attention is derived from the source's (Replace or Refine, optionally reweighted),
and its self-attention is replaced by the source's for its ``self_replace_steps`` fraction.

Candidates that differ only in ``self_replace_steps`` (PRISM's sweep) make identical edits until
the shortest of their windows ends, so they share one branch until then and are forked as their
windows end: the sweep 0.4..0.8 over 50 steps runs 140 candidate-steps instead of 250.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention

from models.request.constants import TOKEN_WINDOW
from models.request.params import P2P_BLEND_THRESHOLD, BlendEditMaps, EditParams


@dataclass
class CandidateControl:
    """How one edit candidate derives its attention from the source branch.

    ``mapper`` is a (77, 77) Replace matrix; for Refine, ``refine_index`` / ``refine_alpha``
    (77,) are set instead. ``equalizer`` (77,) scales cross-attention columns (Reweight).
    """

    cross_replace_steps: float
    self_replace_steps: float
    shared: Hashable = None
    """Equal for candidates whose edits differ only in ``self_replace_steps``."""
    mapper: torch.Tensor | None = None
    refine_index: torch.Tensor | None = None
    refine_alpha: torch.Tensor | None = None
    equalizer: torch.Tensor | None = None
    blend_source_tokens: list[int] | None = None
    blend_tokens: list[int] | None = None
    blend_threshold: float = P2P_BLEND_THRESHOLD

    _blend: tuple[torch.Tensor, ...] | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def blends(self) -> bool:
        return bool(self.blend_source_tokens or self.blend_tokens)

    def to(self, device: torch.device) -> None:
        """Move the mappings, weights and LocalBlend's token weights to ``device`` (once per pass,
        not at every layer of every step)."""
        for name in ("mapper", "refine_index", "refine_alpha", "equalizer"):
            if (value := getattr(self, name)) is not None:
                setattr(self, name, value.to(device))
        self.blend_tensors(device)

    def blend_tensors(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        """LocalBlend's view of the candidate on ``device``: the source's and its own token weights
        (77,), its cut and whether it is left unblended (0-d)."""
        if self._blend is None or self._blend[0].device != torch.device(device):
            source, own = torch.zeros(TOKEN_WINDOW), torch.zeros(TOKEN_WINDOW)
            source[self.blend_source_tokens or []] = 1.0
            own[self.blend_tokens or []] = 1.0
            values = (source, own, torch.tensor(self.blend_threshold), torch.tensor(not self.blends))
            self._blend = tuple(v.to(device) for v in values)
        return self._blend

    def map_cross(self, base: torch.Tensor, edit: torch.Tensor) -> torch.Tensor:
        """Cross-attention of the candidate from the source's ``base`` (heads, queries, 77)."""
        if self.mapper is not None:
            mapped = base @ self.mapper.to(base)
        else:
            alpha = self.refine_alpha.to(base)
            mapped = base[..., self.refine_index.to(base.device)] * alpha + edit * (1 - alpha)
        if self.equalizer is not None:
            mapped = mapped * self.equalizer.to(base)
        return mapped


@dataclass(frozen=True)
class BlendMaps:
    """Which cross-attention maps LocalBlend builds its mask from, how far it grows it, and where
    it cuts it.

    ``side`` is the side of the maps used; None takes a quarter of the latent's side, P2P's
    16x16 maps for a 64x64 latent. ``dilation`` is the max-pooling radius in map cells (P2P: 1).
    ``threshold`` cuts the normalised map; ``word_thresholds`` give blend words their own cut
    (lower-case prompt words). All are properties of a model's attention (see ``load_bundle``): a
    model whose finer maps already localise a finding asks for them, so that thin structures do not
    grow a mask over most of the image, and a finding whose attention spreads past its region (a
    large one, such as an effusion) asks for a higher cut than one that barely lights its map (a
    thin wire).
    """

    side: int | None = None
    dilation: int = 1
    threshold: float = P2P_BLEND_THRESHOLD
    word_thresholds: Mapping[str, float] = field(default_factory=dict)

    def threshold_for(self, words: Iterable[str]) -> float:
        """The cut for a mask of ``words``: the lowest of theirs (the widest region, so no blended
        finding is cut off), ``threshold`` for a word without its own."""
        return min((self.word_thresholds.get(w, self.threshold) for w in words), default=self.threshold)

    def queries(self, latent_hw: tuple[int, int]) -> int:
        """Number of attention queries (pixels) of the maps to use."""
        if self.side is not None:
            return self.side * self.side
        return max(16, (latent_hw[0] // 4) * (latent_hw[1] // 4))


P2P_BLEND_MAPS = BlendMaps()


class LocalBlend:
    """Keep the source latent outside the region the blend words attend to.

    For each candidate the mask is the union of the source's map for its blend words and the
    candidate's map for its own, accumulated over steps, max-pooled over ``maps.dilation`` cells,
    normalised, cut at the candidate's ``blend_threshold``. The maps are those nearest in size to
    ``maps.side``.
    Candidates without blend words are left unblended. ``edit_maps`` "replaced" reads a candidate's
    maps after prompt-to-prompt has replaced and reweighted them, as the reference code does (it
    stores a view its edit step then overwrites); "own" reads them before.
    """

    def __init__(
        self,
        start: float,
        maps: BlendMaps = P2P_BLEND_MAPS,
        edit_maps: BlendEditMaps = EditParams.model_fields["blend_edit_maps"].default,
    ) -> None:
        self.start = start
        self.maps = maps
        self.edit_maps = edit_maps

    def masks(
        self, maps: torch.Tensor, weights: torch.Tensor, thresholds: torch.Tensor, latent_hw: tuple[int, int]
    ) -> torch.Tensor:
        """Binary masks (N, 1, h, w) from accumulated maps (N, r, r, 77) summed over the tokens
        ``weights`` (N, 77) selects, row n cut at ``thresholds[n]``."""
        m = (maps * weights.to(maps.dtype)[:, None, None, :]).sum(-1)[:, None]
        d = self.maps.dilation
        m = F.max_pool2d(m, 2 * d + 1, stride=1, padding=d)
        m = F.interpolate(m, size=latent_hw)
        m = m / m.amax(dim=(2, 3), keepdim=True).clamp_min(1e-12)
        return m > thresholds.to(m.dtype)[:, None, None, None]

    def mask(self, maps: torch.Tensor, candidates: list[CandidateControl], latent_hw: tuple[int, int]) -> torch.Tensor:
        """Boolean masks (K, 1, h, w): True where candidate k may differ from the source."""
        k = len(candidates)
        source_weights, own_weights, thresholds, unblended = (
            torch.stack(parts) for parts in zip(*(c.blend_tensors(maps.device) for c in candidates), strict=True)
        )
        source = self.masks(maps[:1].expand(k, *maps.shape[1:]), source_weights, thresholds, latent_hw)
        own = self.masks(maps[1:], own_weights, thresholds, latent_hw)
        return source | own | unblended[:, None, None, None]

    def apply(self, x: torch.Tensor, maps: torch.Tensor, candidates: list[CandidateControl]) -> torch.Tensor:
        """Candidates take the source's latent outside their mask, exactly."""
        mask = self.mask(maps, candidates, tuple(x.shape[2:]))
        return torch.cat([x[:1], torch.where(mask, x[1:], x[:1])])


class PromptToPromptControl:
    """Attention edits for one batched denoising pass of a source plus K candidates.

    ``step`` is set by the denoising loop before each UNet call. Self-attention is replaced only
    at maps with at most ``self_replace_max_pixels`` queries (32x32 for a 64x64 latent).
    """

    def __init__(
        self,
        candidates: list[CandidateControl],
        num_steps: int,
        latent_hw: tuple[int, int],
        local_blend: LocalBlend | None = None,
    ) -> None:
        self.all_candidates = candidates
        self.num_steps = num_steps
        self.latent_hw = latent_hw
        self.local_blend = local_blend
        self.self_replace_max_pixels = (latent_hw[0] // 2) * (latent_hw[1] // 2)
        self.blend_pixels = local_blend.maps.queries(latent_hw) if local_blend else 0
        self.step = 0
        self._maps: dict[int, torch.Tensor] = {}
        self._blend_queries: int | None = None
        self.groups = self._split([list(range(len(candidates)))], 0)
        self.candidates = [candidates[g[0]] for g in self.groups]

    def _history(self, k: int, step: int) -> Hashable:
        """What candidate k's edit has been up to ``step``: its shared part and its self-attention window."""
        c = self.all_candidates[k]
        end = int(c.self_replace_steps * self.num_steps)
        return c.shared if c.shared is not None else k, end if end <= step else None

    def _split(self, groups: list[list[int]], step: int) -> list[list[int]]:
        split = []
        for group in groups:
            parts: dict[Hashable, list[int]] = {}
            for k in group:
                parts.setdefault(self._history(k, step), []).append(k)
            split.extend(parts.values())
        return split

    def to(self, device: torch.device) -> None:
        """Move every candidate's tensors to ``device``."""
        for candidate in self.all_candidates:
            candidate.to(device)

    def branch_rows(self) -> list[int]:
        """For each row of the conditional half, its candidate's row in [source, candidate 1..K]."""
        return [0] + [1 + group[0] for group in self.groups]

    def fork(self, step: int) -> list[int] | None:
        """Split the branches whose candidates stop sharing their edit at ``step``. Returns, for
        each new row, the row it continues from (None if nothing changed)."""
        groups = self._split(self.groups, step)
        if len(groups) == len(self.groups):
            return None
        parent = {k: row for row, group in enumerate(self.groups, start=1) for k in group}
        rows = [0] + [parent[group[0]] for group in groups]
        self.groups = groups
        self.candidates = [self.all_candidates[g[0]] for g in groups]
        self._maps = {q: maps[rows] for q, maps in self._maps.items()}
        return rows

    def per_candidate(self, x: torch.Tensor) -> torch.Tensor:
        """Rows [source, branches...] -> rows [source, candidate 1..K]."""
        branch = {k: row for row, group in enumerate(self.groups, start=1) for k in group}
        return x[[0] + [branch[k] for k in range(len(self.all_candidates))]]

    def _cross_active(self, c: CandidateControl) -> bool:
        return self.step < int(c.cross_replace_steps * self.num_steps)

    def _self_active(self, c: CandidateControl) -> bool:
        return self.step < int(c.self_replace_steps * self.num_steps)

    def _stores(self, queries: int) -> bool:
        """LocalBlend accumulates the cross-attention maps of one size: every size during the first
        step, which shows the sizes there are, then the one nearest ``blend_pixels``."""
        return self.local_blend is not None and self._blend_queries in (None, queries)

    def needs_probs(self, is_cross: bool, queries: int) -> bool:
        """Whether this layer must materialise its probabilities at the current step: cross-attention
        in the replace window or where LocalBlend reads it. Self-attention never needs to, see
        :meth:`self_attention_rows`."""
        if is_cross:
            return any(self._cross_active(c) for c in self.candidates) or self._stores(queries)
        return False

    def _self_replaced(self, c: CandidateControl, queries: int) -> bool:
        return self._self_active(c) and queries <= self.self_replace_max_pixels

    def self_attention_rows(self, queries: int, batch: int) -> list[int] | None:
        """Replacing a candidate's self-attention probabilities by the source's is the same as
        attending with the source's queries and keys over the candidate's own values: for each
        row of the batch, the row whose queries and keys it uses (None: its own, everywhere)."""
        replaced = [self._self_replaced(c, queries) for c in self.candidates]
        if not any(replaced):
            return None
        half = batch // 2
        return [*range(half), half, *(half if r else half + k for k, r in enumerate(replaced, start=1))]

    def __call__(self, probs: torch.Tensor, is_cross: bool, batch: int) -> torch.Tensor:
        """Edit attention probabilities of shape (batch * heads, queries, keys)."""
        heads = probs.shape[0] // batch
        p = probs.view(batch, heads, *probs.shape[1:])
        half = batch // 2
        cond = p[half:]
        store = is_cross and self._stores(probs.shape[1])
        if store and self.local_blend.edit_maps == "own":
            self._store(cond)
        base = cond[0]
        out = [base]
        for k, c in enumerate(self.candidates, start=1):
            own = cond[k]
            if is_cross:
                out.append(c.map_cross(base, own) if self._cross_active(c) else own)
            elif self._self_replaced(c, probs.shape[1]):
                out.append(base)
            else:
                out.append(own)
        edited = torch.stack(out)
        if store and self.local_blend.edit_maps == "replaced":
            self._store(edited)
        return torch.cat([p[:half], edited]).view_as(probs)

    def _store(self, cond: torch.Tensor) -> None:
        queries = cond.shape[2]
        head_mean = cond.float().mean(1)
        if queries in self._maps:
            self._maps[queries] += head_mean
        else:
            self._maps[queries] = head_mean.clone()

    def after_step(self, x: torch.Tensor) -> torch.Tensor:
        """Apply LocalBlend to the latents (B, C, h, w) once ``start`` of the steps have passed."""
        if self.local_blend is None or not self._maps:
            return x
        if self._blend_queries is None:
            self._blend_queries = min(self._maps, key=lambda q: abs(q - self.blend_pixels))
            self._maps = {self._blend_queries: self._maps[self._blend_queries]}
        if self.step < int(self.local_blend.start * self.num_steps):
            return x
        side = int(round(self._blend_queries**0.5))
        maps = self._maps[self._blend_queries].view(x.shape[0], side, side, -1).to(x.dtype)
        return self.local_blend.apply(x, maps, self.candidates)


class AttentionControl(Protocol):
    """Reads or edits attention probabilities: prompt-to-prompt when editing, a recorder in training."""

    def needs_probs(self, is_cross: bool, queries: int) -> bool:
        """Whether a layer with ``queries`` queries must materialise its probabilities now."""

    def self_attention_rows(self, queries: int, batch: int) -> list[int] | None:
        """Per batch row, the row whose self-attention queries and keys it uses (None: its own)."""

    def __call__(self, probs: torch.Tensor, is_cross: bool, batch: int) -> torch.Tensor:
        """The probabilities (batch * heads, queries, keys) to use instead of ``probs``."""


class StackedControl:
    """The controls of several images' passes run as one UNet batch, ``[uncond of pass 1..P, cond
    of pass 1..P]``: each control sees its own pass's rows as the batch it expects, ``[uncond x n,
    cond x n]``. ``controls`` (None: a pass without control) and ``sizes`` (rows per pass) are set
    by the denoising loop before each UNet call."""

    def __init__(self) -> None:
        self.controls: list[AttentionControl | None] = []
        self.sizes: list[int] = []
        self.indices = DeviceIndices()

    def _passes(self, batch: int) -> Iterable[tuple[AttentionControl, int, list[int]]]:
        """Each pass with a control, its rows per half, and where its rows are in the whole batch."""
        half, offset = batch // 2, 0
        for control, n in zip(self.controls, self.sizes, strict=True):
            if control is not None:
                yield control, n, [*range(offset, offset + n), *range(half + offset, half + offset + n)]
            offset += n

    def needs_probs(self, is_cross: bool, queries: int) -> bool:
        return any(c.needs_probs(is_cross, queries) for c in self.controls if c is not None)

    def self_attention_rows(self, queries: int, batch: int) -> list[int] | None:
        if len(self.controls) == 1:
            return self.controls[0].self_attention_rows(queries, batch)
        out, changed = list(range(batch)), False
        for control, n, index in self._passes(batch):
            own = control.self_attention_rows(queries, 2 * n)
            if own is not None:
                changed = True
                for row, source in enumerate(own):
                    out[index[row]] = index[source]
        return out if changed else None

    def __call__(self, probs: torch.Tensor, is_cross: bool, batch: int) -> torch.Tensor:
        if len(self.controls) == 1:
            return self.controls[0](probs, is_cross, batch)
        heads = probs.shape[0] // batch
        p = probs.view(batch, heads, *probs.shape[1:])
        out = p.clone()
        for control, n, rows in self._passes(batch):
            index = self.indices(rows, probs.device)
            own = p[index].reshape(2 * n * heads, *probs.shape[1:])
            out[index] = control(own, is_cross, 2 * n).view(2 * n, heads, *probs.shape[1:])
        return out.view_as(probs)


class DeviceIndices:
    """Row indices as tensors on the device, made once per distinct list: indexing a device tensor
    with a Python list copies the list from the host at every call, at every layer of every step."""

    def __init__(self) -> None:
        self._made: dict[tuple[tuple[int, ...], torch.device], torch.Tensor] = {}

    def __call__(self, rows: list[int], device: torch.device) -> torch.Tensor:
        key = (tuple(rows), device)
        if key not in self._made:
            self._made[key] = torch.tensor(rows, device=device)
        return self._made[key]


class ControlledAttnProcessor:
    """Attention whose probabilities a controller reads or edits where it asks to (``needs_probs``);
    everywhere else the fused ``scaled_dot_product_attention`` runs, as in diffusers' default
    processor, with the queries and keys the controller picks (``self_attention_rows``).
    ``fused=False`` materialises every layer (the reference for tests and benchmarks).
    """

    def __init__(self, control: AttentionControl, fused: bool = True) -> None:
        self.control = control
        self.fused = fused
        self.indices = DeviceIndices()

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        batch = hidden_states.shape[0]
        is_cross = encoder_hidden_states is not None
        sequence_length = (encoder_hidden_states if is_cross else hidden_states).shape[1]
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if not is_cross:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key, value = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
        if self.fused and not self.control.needs_probs(is_cross, query.shape[1]):
            rows = None if is_cross else self.control.self_attention_rows(query.shape[1], batch)
            if rows is not None:
                index = self.indices(rows, query.device)
                query, key = query[index], key[index]
            hidden_states = _fused_attention(attn, query, key, value, attention_mask, batch)
        else:
            query, key, value = (attn.head_to_batch_dim(t) for t in (query, key, value))
            probs = self.control(attn.get_attention_scores(query, key, attention_mask), is_cross, batch)
            hidden_states = attn.batch_to_head_dim(torch.bmm(probs, value))
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def _fused_attention(
    attn: Attention,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    batch: int,
) -> torch.Tensor:
    """softmax(q k^T * scale) v without the probability matrix: (batch, queries, heads * head_dim)."""
    head_dim = key.shape[-1] // attn.heads
    q, k, v = (t.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
    if attention_mask is not None:
        attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, scale=attn.scale)
    return out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
