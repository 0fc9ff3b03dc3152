"""Video object segmentation by label propagation in the frozen patch-feature space.

DINO (Caron et al. 2021), Sec. 4.2.2 / Table 5 "DAVIS 2017 video instance tracking", following the
protocol of Jabri et al. 2020: the first frame's masks are carried through the video by nearest
neighbours between patch features. No training.

For each frame t >= 1 the context is frame 0 plus the last ``n_last_frames`` frames (their features
and their SOFT propagated labels). Every target patch looks at the context patches inside a
(2r+1) x (2r+1) window around its own grid position in every context frame (frame 0 included),
weighs them by exp(cos / T), keeps the top-k weights JOINTLY over all context frames (everything
below the k-th value is dropped, so ties may keep more, as in the reference), normalises them and
takes the weighted sum of the context labels.

Unlike the reference, the dense (hw x hw) affinity and the (hw x hw) window mask are never built:
the target grid is cut into tiles, each tile is compared (matrix products) with the context
region its windows can reach, and only the window entries are kept -- memory O(hw * window) instead
of O(hw^2) (the reference needs more than 16 GB at patch 8 on a 480x1152 video).

A whole run (frames read and embedded in batches, masks written, scores) is
:mod:`dinokit.eval.davis_run`.
"""

from __future__ import annotations

import functools
from collections import deque
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import DinokitError
from ..runtime import autocast


@dataclass
class PropagationConfig:
    """The reference's defaults (DINO ``eval_video_segmentation.py``)."""

    n_last_frames: int = 7  #: previous frames kept in the context queue (besides frame 0)
    neighborhood: int = 12  #: window radius r in patches; 0 = the whole frame
    topk: int = 5  #: neighbours kept jointly over all context frames
    temperature: float = 0.1  #: affinity = exp(cos / temperature)
    #: largest target tile (rows, columns) in patches, balanced over the grid: speed, not results
    tile: tuple[int, int] = (10, 13)
    #: compare a strip of tiles at a time (None: on GPUs) rather than a tile at a time (CPUs)
    batched: bool | None = None
    #: dtype of the patch similarities' matrix products (None = float32, as the reference);
    #: ``--precision bf16`` sets bfloat16 (cosines rounded to 3 digits; 2-3x faster on CPUs and GPUs)
    similarity_dtype: torch.dtype | None = None

    def validate(self) -> None:
        if self.n_last_frames < 0:
            raise DinokitError("--n-last-frames must be 0 or more.")
        if self.neighborhood < 0:
            raise DinokitError("--neighborhood must be 0 (whole frame) or a positive radius in patches.")
        if self.topk < 1:
            raise DinokitError("--k must be at least 1.")
        if not self.temperature > 0:
            raise DinokitError("--temperature must be positive.")
        if isinstance(self.tile, int):
            self.tile = (self.tile, self.tile)
        if min(self.tile) < 1:
            raise DinokitError("The tile size must be positive.")


# -- window geometry (index tensors, no Python loops over patches) -------------------------------
@dataclass(frozen=True)
class WindowGeometry:
    """Index tensors for the (2r+1)^2 windows on an h x w grid, cut into tile_h x tile_w tiles.

    A tile's windows reach tile_h + 2r padded rows and ``strip_width`` = tile_w + 2r padded columns.
    Each context frame is stored once as overlapping column strips (n_tiles_w, padded_h, strip_width,
    D), so that the region of every tile is a contiguous block of its strip: the similarities are
    plain matrix products (one per tile on a CPU, a strided batch per strip on a GPU), with no
    gathering of features.
    """

    h: int
    w: int
    radius: int
    tile_h: int
    tile_w: int
    n_tiles_h: int
    n_tiles_w: int
    neighbour: torch.Tensor  #: (hw, W2) int64: flat index of the window entry (clamped when outside)
    outside: torch.Tensor  #: (hw, 1, W2) bool: the window entry lies outside the frame
    rows: torch.Tensor  #: (hw,) int64: the row of each grid cell (row-major) in the tile-ordered similarities
    cells: torch.Tensor  #: (n_rows,) int64: the grid cell of each tile-ordered row, -1 past the grid

    @property
    def window_size(self) -> int:
        return (2 * self.radius + 1) ** 2

    @property
    def padded_shape(self) -> tuple[int, int]:
        return self.n_tiles_h * self.tile_h + 2 * self.radius, self.n_tiles_w * self.tile_w + 2 * self.radius

    @property
    def strip_width(self) -> int:
        return self.tile_w + 2 * self.radius


def effective_radius(radius: int, h: int, w: int) -> int:
    """Radius 0 means the whole frame (the reference's ``size_mask_neighborhood = 0``)."""
    return max(h, w) - 1 if radius == 0 else radius


@functools.lru_cache(maxsize=8)
def _geometry_cpu(h: int, w: int, radius: int, max_tile_h: int, max_tile_w: int) -> WindowGeometry:
    # balanced tiles no bigger than asked: the fewest tiles, cut as evenly as the grid allows, so
    # that few padding rows are computed (30 rows in tiles of 10, not 4 x 8 = 32)
    tile_h = -(-h // -(-h // max(1, max_tile_h)))
    tile_w = -(-w // -(-w // max(1, max_tile_w)))
    n_tiles_h, n_tiles_w = -(-h // tile_h), -(-w // tile_w)
    offsets, side = torch.arange(-radius, radius + 1), 2 * radius + 1
    dy = offsets.repeat_interleave(side)  # (W2,) row offset, row-major over the window
    dx = offsets.repeat(side)
    cell_row = torch.arange(h).repeat_interleave(w)  # (hw,)
    cell_col = torch.arange(w).repeat(h)
    entry_row = cell_row[:, None] + dy[None]  # (hw, W2)
    entry_col = cell_col[:, None] + dx[None]
    valid = (entry_row >= 0) & (entry_row < h) & (entry_col >= 0) & (entry_col < w)
    neighbour = entry_row.clamp(0, h - 1) * w + entry_col.clamp(0, w - 1)
    # similarities come tile by tile: (strip j, tile row i, position a * tile_w + b inside the tile)
    tile_index = (cell_col // tile_w) * n_tiles_h + cell_row // tile_h
    rows = tile_index * (tile_h * tile_w) + (cell_row % tile_h) * tile_w + cell_col % tile_w
    cells = torch.full((n_tiles_w * n_tiles_h * tile_h * tile_w,), -1, dtype=torch.int64)
    cells[rows] = torch.arange(h * w)
    return WindowGeometry(
        h, w, radius, tile_h, tile_w, n_tiles_h, n_tiles_w, neighbour, (~valid).unsqueeze(1), rows, cells
    )


_DEVICE_GEOMETRY: dict = {}


def window_geometry(
    h: int, w: int, radius: int, tile: tuple[int, int] = (10, 13), device: torch.device | str = "cpu"
) -> WindowGeometry:
    """The window index tensors for an h x w grid on ``device`` (cached)."""
    device = torch.device(device)
    g = _geometry_cpu(h, w, radius, int(tile[0]), int(tile[1]))
    if device.type == "cpu":
        return g
    key = (h, w, radius, tuple(tile), str(device))
    if key not in _DEVICE_GEOMETRY:
        if len(_DEVICE_GEOMETRY) > 8:
            _DEVICE_GEOMETRY.clear()
        _DEVICE_GEOMETRY[key] = WindowGeometry(
            g.h, g.w, g.radius, g.tile_h, g.tile_w, g.n_tiles_h, g.n_tiles_w,
            g.neighbour.to(device), g.outside.to(device),
            g.rows.to(device), g.cells.to(device),
        )  # fmt: skip
    return _DEVICE_GEOMETRY[key]


def key_strips(feats: torch.Tensor, geom: WindowGeometry) -> torch.Tensor:
    """(h, w, D) normalised context features -> (n_tiles_w, padded_h, strip_width, D) overlapping
    column strips of the grid zero-padded by r (and to whole tiles); made once per context frame."""
    h, w, _ = feats.shape
    radius = geom.radius
    padded_h, padded_w = geom.padded_shape
    padded = F.pad(feats, (0, 0, radius, padded_w - w - radius, radius, padded_h - h - radius))
    strips = padded.unfold(1, geom.strip_width, geom.tile_w)  # (padded_h, n_tiles_w, D, strip_width)
    return strips.permute(1, 0, 3, 2).contiguous()


def query_tiles(feats: torch.Tensor, geom: WindowGeometry) -> torch.Tensor:
    """(h, w, D) -> (n_tiles_w, n_tiles_h, tile_h * tile_w, D), the grid zero-padded to whole tiles."""
    h, w, dim = feats.shape
    tile_h, tile_w, n_tiles_h, n_tiles_w = geom.tile_h, geom.tile_w, geom.n_tiles_h, geom.n_tiles_w
    padded = F.pad(feats, (0, 0, 0, n_tiles_w * tile_w - w, 0, n_tiles_h * tile_h - h))
    tiles = padded.view(n_tiles_h, tile_h, n_tiles_w, tile_w, dim).permute(2, 0, 1, 3, 4)
    return tiles.reshape(n_tiles_w, n_tiles_h, tile_h * tile_w, dim)


def offset_features(x: torch.Tensor, value: float) -> torch.Tensor:
    """(..., D) -> (..., D + 1) with ``value`` appended (nothing appended when it is 0).

    16-bit similarities are products of 16-bit features accumulated in float32, then rounded to 16
    bits: near a cosine of 1, bfloat16 steps by 0.004, and the top-k would meet ties by the dozen
    (the reference keeps every tie). Queries get a last entry -1 and keys +1, so that a product
    holds cosine - 1, rounded where bfloat16 is 10-100x finer for the cosines that matter (0.5-1).
    """
    if not value:
        return x
    return torch.cat([x, x.new_full((*x.shape[:-1], 1), value)], dim=-1)


@dataclass(frozen=True)
class WorkspaceKey:
    """What the scratch of :func:`window_topk` depends on: another grid, tiling, context length,
    dtype, device, offset or strategy needs other buffers."""

    height: int
    width: int
    radius: int
    tile_h: int
    tile_w: int
    n_context: int
    dtype: torch.dtype
    device: torch.device
    offset: float
    batched: bool


def _as_bits(x: torch.Tensor) -> torch.Tensor:
    """16-bit values as int16 (the same bits): copying them is faster than as bfloat16/float16."""
    return x.view(torch.int16) if x.element_size() == 2 else x


@dataclass(eq=False)
class WindowWorkspace:
    """The scratch of :func:`window_topk`, kept by a :class:`LabelPropagator` across target frames
    and videos, and made anew by :meth:`prepare` when its :class:`WorkspaceKey` changes.

    A tile's block is rows ``[i * tile_h, i * tile_h + block_rows)`` of its padded strip
    (``block_rows = tile_h + 2r``), ``block_size = block_rows * strip_width`` context cells.
    """

    key: WorkspaceKey | None = None
    geometry: WindowGeometry | None = None
    #: the products of the target tiles with their blocks in every context frame, filled with
    #: 0 - offset (what the zero padding makes): tiled (n_tiles_h, n_context, tile_cells, block_size),
    #: one tile row after another, as the rows cut off at the frame's edges differ by tile row;
    #: batched (n_context, n_tiles_h, tile_cells, block_size), a whole strip at a time
    products: torch.Tensor | None = None
    #: the window entries read out of the products: those of one tile (tile_cells, n_entries) when
    #: tiled, of every tile (n_tiles_w, n_tiles_h, tile_cells, n_entries) when batched
    windows: torch.Tensor | None = None
    #: per tile row, the windows inside the products as a strided view (n_context, tile_h, tile_w,
    #: side, side), in :func:`_as_bits`
    product_windows: list[torch.Tensor] = field(default_factory=list)
    #: tiled only: per tile row, the context rows ``[first, end)`` inside the frame
    row_spans: list[tuple[int, int]] = field(default_factory=list)
    #: tiled only: per tile row and context frame, the part of the products its matrix product fills
    tile_products: list[list[torch.Tensor]] = field(default_factory=list)
    #: the strips of the current context frames (held, compared by identity) with their block views
    context_blocks: list[tuple[torch.Tensor, list]] = field(default_factory=list)

    def prepare(
        self, query: torch.Tensor, geom: WindowGeometry, n_context: int, offset: float, batched: bool
    ) -> None:
        """Make the buffers for this grid and context unless those already held fit."""
        key = WorkspaceKey(geom.h, geom.w, geom.radius, geom.tile_h, geom.tile_w, n_context, query.dtype,
                           query.device, offset, batched)  # fmt: skip
        if key == self.key:
            return
        tile_h, tile_w, n_tile_rows, n_strips = geom.tile_h, geom.tile_w, geom.n_tiles_h, geom.n_tiles_w
        radius, strip_width = geom.radius, geom.strip_width
        block_rows, side = tile_h + 2 * radius, 2 * radius + 1
        block_size, tile_cells, n_entries = block_rows * strip_width, tile_h * tile_w, n_context * side * side
        if batched:
            products = query.new_full((n_context, n_tile_rows, tile_cells, block_size), -offset)
            windows = query.new_empty((n_strips, n_tile_rows, tile_cells, n_entries))
            context_stride, tile_row_stride = n_tile_rows * tile_cells * block_size, tile_cells * block_size
        else:
            products = query.new_full((n_tile_rows, n_context, tile_cells, block_size), -offset)
            windows = query.new_empty((tile_cells, n_entries))
            context_stride, tile_row_stride = tile_cells * block_size, n_context * tile_cells * block_size
        # target (a, b) of a tile meets rows a..a+2r and columns b..b+2r of its block: the windows
        # are a strided view of the products, copied out in one go
        strides = (context_stride, tile_w * block_size + strip_width, block_size + 1, strip_width, 1)
        self.product_windows = [
            _as_bits(products).as_strided(
                (n_context, tile_h, tile_w, side, side), strides, i * tile_row_stride
            )
            for i in range(n_tile_rows)
        ]
        # tile by tile, a block is cut to the frame's rows [first, end) (one plain product per
        # context frame, written in place); the rest of the products stays at 0 - offset
        self.row_spans = [
            (max(i * tile_h, radius), min(i * tile_h + block_rows, radius + geom.h))
            for i in range(n_tile_rows)
        ]
        self.tile_products = [] if batched else [
            [products[i, f, :, (first - i * tile_h) * strip_width : (end - i * tile_h) * strip_width]
             for f in range(n_context)]
            for i, (first, end) in enumerate(self.row_spans)
        ]  # fmt: skip
        self.key, self.geometry, self.products, self.windows = key, geom, products, windows
        self.context_blocks = []

    def blocks(self, strips: list[torch.Tensor]) -> list[list]:
        """The block views of each context frame's strips, per strip: made once per context frame,
        which serves every target frame that has it in its context."""
        held = self.context_blocks
        self.context_blocks = []
        for keys in strips:
            views = next((views for known, views in held if known is keys), None)
            self.context_blocks.append((keys, self._block_views(keys) if views is None else views))
        return [views for _, views in self.context_blocks]

    def _block_views(self, keys: torch.Tensor) -> list:
        geom = self.geometry
        assert geom is not None and self.key is not None, "prepare() made the workspace"
        dim, strip_width, tile_h = keys.shape[-1], geom.strip_width, geom.tile_h
        block_size = (tile_h + 2 * geom.radius) * strip_width
        if (
            self.key.batched
        ):  # the blocks of a strip as one strided batch of overlapping (dim, block) matrices
            shape, strides = (geom.n_tiles_h, block_size, dim), (tile_h * strip_width * dim, dim, 1)
            return [keys[j].as_strided(shape, strides).transpose(1, 2) for j in range(geom.n_tiles_w)]
        flat = [keys[j].view(-1, dim) for j in range(geom.n_tiles_w)]
        return [
            [strip[first * strip_width : end * strip_width].t() for first, end in self.row_spans]
            for strip in flat
        ]


def window_topk(
    query: torch.Tensor,
    strips: list[torch.Tensor],
    geom: WindowGeometry,
    k: int,
    temperature: float = 0.1,
    margin: int = 8,
    workspace: WindowWorkspace | None = None,
    offset: float = 0.0,
    batched: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The joint top-k of the window affinities exp(cos / T) (0 outside the frame), as
    :func:`joint_topk` returns it: (weights (hw, K'), indices into F * W2, grid order).

    ``query``: (h, w, D) L2-normalised target features; ``strips``: one :func:`key_strips` tensor per
    context frame. Each target tile is compared with the context blocks its windows reach (every
    context frame), its windows are read out of the products, and their top k + ``margin`` taken.
    ``batched`` (default: on GPUs) does that a strip at a time (:func:`_batched_window_topk`);
    otherwise a tile at a time (:func:`_tiled_window_topk`, on CPUs). ``offset``: the products hold
    cosine - offset (see :func:`offset_features`). ``workspace``: kept between calls, to reuse the
    scratch.

    exp(. / T) is increasing, so the top-k of the affinities are those of the cosines, and only the
    kept ones are exponentiated. Window entries outside the frame meet the zero padding of the
    strips, a cosine of exactly 0: wherever the k-th largest cosine is above 0 they are below it and
    drop out by themselves; the few rows where it is not (or with more ties than ``margin``) go
    through the masked formulation.
    """
    n_context = len(strips)
    n_entries = n_context * geom.window_size
    k = min(k, n_entries)
    n_kept = min(n_entries, k + margin)
    batched = query.device.type != "cpu" if batched is None else bool(batched)
    workspace = WindowWorkspace() if workspace is None else workspace
    workspace.prepare(query, geom, n_context, offset, batched)
    targets = query_tiles(query, geom)  # (n_tiles_w, n_tiles_h, tile_cells, D)
    blocks = workspace.blocks(strips)
    strategy = _batched_window_topk if batched else _tiled_window_topk
    top_values, top_indices, full_rows = strategy(targets, blocks, workspace, k, n_kept, offset, temperature)
    return _window_weights(
        top_values, top_indices, full_rows, geom, k, n_context, margin, offset, temperature
    )


#: grid cells whose top k + margin cannot be used as they are, with their whole row of windows
FullRows = list[tuple[torch.Tensor, torch.Tensor]]


def _tiled_window_topk(
    targets: torch.Tensor,
    blocks: list,
    ws: WindowWorkspace,
    k: int,
    n_kept: int,
    offset: float,
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor, FullRows]:
    """A tile at a time (CPUs): the scratch stays small enough for the caches. Returns the top
    values and indices (n_tiles_w, n_tiles_h, tile_cells, n_kept) in tile order and the full rows."""
    geom = ws.geometry
    assert geom is not None and ws.windows is not None, "prepare() made the workspace"
    n_strips, n_tile_rows, tile_cells = targets.shape[:3]
    side, n_context = 2 * geom.radius + 1, len(blocks)
    n_entries = ws.windows.shape[-1]
    tile_windows = ws.windows  # (tile_cells, n_entries)
    top_values = targets.new_empty((n_strips, n_tile_rows, tile_cells, n_kept))
    top_indices = torch.empty(
        (n_strips, n_tile_rows, tile_cells, n_kept), dtype=torch.int64, device=targets.device
    )
    full_rows: FullRows = []
    for j in range(n_strips):
        for i in range(n_tile_rows):
            for f, views in enumerate(blocks):
                torch.mm(targets[j, i], views[j][i], out=ws.tile_products[i][f])
            window_view = _as_bits(tile_windows).view(geom.tile_h, geom.tile_w, n_context, side, side)
            window_view.permute(2, 0, 1, 3, 4).copy_(ws.product_windows[i])
            values, indices = tile_windows.topk(n_kept, dim=-1)
            top_values[j, i], top_indices[j, i] = values, indices
            redo = _needs_full_row(values, k, n_entries, offset, temperature)
            if bool(redo.any()):  # a host synchronisation: tile by tile is for CPUs
                rows = (j * n_tile_rows + i) * tile_cells + redo.nonzero()[:, 0]
                real = geom.cells[rows] >= 0
                if bool(real.any()):
                    full_rows.append((geom.cells[rows[real]], tile_windows[redo][real].float()))
    return top_values, top_indices, full_rows


def _batched_window_topk(
    targets: torch.Tensor,
    blocks: list,
    ws: WindowWorkspace,
    k: int,
    n_kept: int,
    offset: float,
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor, FullRows]:
    """A strip at a time (GPUs): one strided batch of products per strip and context frame, one
    top-k at the end, no host synchronisation per tile. Returns what :func:`_tiled_window_topk` does."""
    geom = ws.geometry
    assert geom is not None and ws.windows is not None and ws.products is not None, (
        "prepare() made the workspace"
    )
    n_strips, n_tile_rows = targets.shape[:2]
    side, n_context = 2 * geom.radius + 1, len(blocks)
    windows = ws.windows  # (n_strips, n_tile_rows, tile_cells, n_entries)
    n_entries = windows.shape[-1]
    for j in range(n_strips):
        for f, views in enumerate(blocks):
            torch.bmm(targets[j], views[j], out=ws.products[f])
        for i in range(n_tile_rows):
            window_view = _as_bits(windows[j, i]).view(geom.tile_h, geom.tile_w, n_context, side, side)
            window_view.permute(2, 0, 1, 3, 4).copy_(ws.product_windows[i])
    flat = windows.view(-1, n_entries)
    top_values, top_indices = flat.topk(n_kept, dim=-1)
    redo = _needs_full_row(top_values, k, n_entries, offset, temperature) & (geom.cells >= 0)
    full_rows: FullRows = []
    if bool(redo.any()):
        rows = redo.nonzero()[:, 0]
        full_rows.append((geom.cells[rows], flat[rows].float()))
    return top_values, top_indices, full_rows


def _window_weights(
    top_values: torch.Tensor,
    top_indices: torch.Tensor,
    full_rows: FullRows,
    geom: WindowGeometry,
    k: int,
    n_context: int,
    margin: int,
    offset: float,
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The normalised affinities of the kept entries in grid order; the full rows through
    :func:`joint_topk` with the entries outside the frame masked."""
    n_kept = top_values.shape[-1]
    top_values = top_values.reshape(-1, n_kept)[geom.rows]  # grid order from here on
    indices = top_indices.reshape(-1, n_kept)[geom.rows]
    aff = torch.exp_(
        top_values.float().add_(offset).div_(temperature)
    )  # the affinities, as joint_topk sees them
    kth = aff[:, k - 1 : k]
    weights = torch.where(aff >= kth, aff, torch.zeros_like(aff))
    weights = weights / weights.sum(-1, keepdim=True)
    if full_rows:
        cells = torch.cat([c for c, _ in full_rows])
        a = torch.cat([x for _, x in full_rows]).add_(offset).view(len(cells), n_context, -1)
        a = torch.exp_(a.masked_fill_(geom.outside[cells], float("-inf")).div_(temperature)).view(
            len(cells), -1
        )
        w2, i2 = joint_topk(a, k, margin)
        width = max(weights.shape[-1], w2.shape[-1])
        weights, indices, w2, i2 = (F.pad(t, (0, width - t.shape[-1])) for t in (weights, indices, w2, i2))
        weights[cells], indices[cells] = w2, i2
    return weights, indices


def _needs_full_row(vals: torch.Tensor, k: int, n: int, offset: float, temperature: float) -> torch.Tensor:
    """Rows whose top k + margin cannot be used as they are: the k-th cosine is 0 or less (entries
    outside the frame might be among the kept), or the last one ties with the k-th affinity (more
    ties than the margin holds; compared as affinities, as :func:`joint_topk` does)."""
    kth = vals[:, k - 1].float() + offset
    redo = kth <= 0
    if vals.shape[-1] < n:
        last = vals[:, -1].float() + offset
        redo |= torch.exp(last / temperature) >= torch.exp(kth / temperature)
    return redo


def joint_topk(aff: torch.Tensor, k: int, margin: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep, per row, every value not below the row's k-th largest (ties keep more), normalised to
    sum 1. Returns (weights (hw, K'), column indices (hw, K')) with K' >= k; padding weights are 0.

    One top-(k + margin) pass covers up to ``margin`` values tied with the k-th; only when a row has
    more ties is the selection widened to all of them.
    """
    n = aff.shape[-1]
    k = min(k, n)
    vals, idx = aff.topk(min(n, k + margin), dim=-1)
    kth = vals[:, k - 1 : k]
    if vals.shape[-1] < n and bool((vals[:, -1:] >= kth).any()):
        n_keep = int((aff >= kth).sum(-1).max())  # more ties than the margin: take them all
        vals, idx = aff.topk(min(n, n_keep + 1), dim=-1)
    vals = torch.where(vals >= kth, vals, torch.zeros_like(vals))
    return vals / vals.sum(-1, keepdim=True), idx


class LabelPropagator:
    """Carries soft labels from frame 0 through a video, one target frame at a time.

    ``start(features0, labels0)`` with frame 0's (h, w, D) features and (C, h, w) one-hot labels, then
    ``step(features_t)`` for t = 1, 2, ... returns frame t's soft labels (C, h, w). Features need not
    be normalised. Only frame 0 and the last ``n_last_frames`` frames are kept.
    """

    def __init__(self, config: PropagationConfig | None = None):
        self.config = config or PropagationConfig()
        self.config.validate()
        self.geom: WindowGeometry | None = None
        self._keys0: torch.Tensor | None = None
        self._labels0: torch.Tensor | None = None
        self._queue: deque = deque(maxlen=self.config.n_last_frames)
        self._workspace = WindowWorkspace()

    @torch.no_grad()
    def start(self, features0: torch.Tensor, labels0: torch.Tensor) -> None:
        h, w, _ = features0.shape
        if labels0.shape[-2:] != (h, w):
            raise ValueError(f"labels {tuple(labels0.shape)} do not match the feature grid {h}x{w}")
        r = effective_radius(self.config.neighborhood, h, w)
        self.geom = window_geometry(h, w, r, self.config.tile, features0.device)
        self._keys0 = self._pad(features0)
        self._labels0 = labels0.float().reshape(labels0.shape[0], -1).t().contiguous()  # (hw, C)
        self._queue.clear()

    @property
    def _offset(self) -> float:
        dt = self.config.similarity_dtype
        return 1.0 if dt is not None and torch.finfo(dt).bits < 32 else 0.0

    def _unit(self, features: torch.Tensor, sign: float) -> torch.Tensor:
        """L2-normalised features with the offset entry (+1 for keys, -1 for queries), in the
        similarity dtype."""
        unit = offset_features(F.normalize(features.float(), dim=-1), sign * self._offset)
        dt = self.config.similarity_dtype
        return unit if dt is None else unit.to(dt)

    def _pad(self, features: torch.Tensor) -> torch.Tensor:
        assert self.geom is not None, "start() sets the grid"
        keys = key_strips(self._unit(features, 1.0), self.geom)  # cast first: the strips repeat 2r columns
        if self._offset:
            keys[..., -1] = 1.0  # the padding too: its product is then 0 - offset, a cosine of 0
        return keys

    @torch.no_grad()
    def remember(self, features: torch.Tensor, soft_labels: torch.Tensor) -> None:
        """Push a frame's features and soft labels (C, h, w) into the context queue."""
        if self.config.n_last_frames == 0:
            return
        keys = self._pad(features)
        self._queue.append((keys, soft_labels.reshape(soft_labels.shape[0], -1).t().contiguous()))

    @torch.no_grad()
    def weights(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The kept neighbours of a target frame: (weights (hw, K'), flat context indices (hw, K'))
        into the stacked context labels (F * hw) -- no label is needed for this part."""
        if self.geom is None:
            raise RuntimeError("call start() first")
        g = self.geom
        query = self._unit(features, -1.0)
        keys = [self._keys0] + [k for k, _ in self._queue]
        w, idx = window_topk(
            query,
            keys,
            g,
            self.config.topk,
            self.config.temperature,
            workspace=self._workspace,
            offset=self._offset,
            batched=self.config.batched,
        )
        W2 = g.window_size
        frame = torch.div(idx, W2, rounding_mode="floor")
        flat = frame * (g.h * g.w) + g.neighbour.gather(1, idx - frame * W2)
        return w, flat

    @torch.no_grad()
    def step(self, features: torch.Tensor) -> torch.Tensor:
        """Soft labels (C, h, w) of the next frame; the frame then joins the context queue."""
        w, flat = self.weights(features)
        labels = torch.cat([self._labels0] + [lab for _, lab in self._queue])  # (F*hw, C)
        soft = (labels[flat] * w.unsqueeze(-1)).sum(1)  # (hw, C)
        assert self.geom is not None  # weights() refuses a propagator that was not started
        out = soft.t().reshape(-1, self.geom.h, self.geom.w).contiguous()
        self.remember(features, out)
        return out


def soft_labels_to_mask(soft: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(C, h, w) soft labels -> (h*p, w*p) int64 labels: bilinear upsampling by the patch size
    (align_corners False), per-channel min-max normalisation (channels whose max is 0 are left as
    they are), argmax -- the reference's output step."""
    up = F.interpolate(
        soft.unsqueeze(0),
        scale_factor=patch_size,
        mode="bilinear",
        align_corners=False,
        recompute_scale_factor=False,
    )[0]
    mn, mx = up.amin(dim=(1, 2), keepdim=True), up.amax(dim=(1, 2), keepdim=True)
    pos = mx > 0
    # (up - min) / (max - min) where max > 0, in place; the other channels: (up - 0) / 1, unchanged
    up.sub_(torch.where(pos, mn, 0.0)).div_(torch.where(pos, mx - mn, 1.0))
    # argmax over the few channels as a running maximum (the first maximum wins, as argmax): a
    # reduction over the first dimension is slow on CPUs, and so is moving it last
    best, labels = up[0].clone(), torch.zeros(up.shape[1:], dtype=torch.int64, device=up.device)
    for c in range(1, up.shape[0]):
        # a constant positive channel normalises to 0/0 = NaN, which argmax (and the reference's
        # max) takes as the largest value: the first NaN wins
        higher = (up[c] > best) | (up[c].isnan() & ~best.isnan())
        best = torch.where(higher, up[c], best)
        labels.masked_fill_(higher, c)
    return labels


# -- whole videos ---------------------------------------------------------------------------------
@torch.no_grad()
def patch_features(model: nn.Module, frames: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """(B, 3, H, W) frames -> (B, H/p, W/p, D) float32: the last block's patch tokens after the final
    LayerNorm (no CLS token)."""
    forward_features, p = getattr(model, "forward_features", None), getattr(model, "patch_size", None)
    if forward_features is None or p is None:
        raise DinokitError("Label propagation needs a ViT backbone (patch features); ResNet-50 has none.")
    B, _, H, W = frames.shape
    with autocast(frames.device, dtype):
        tokens = forward_features(frames)[:, 1:]
    return tokens.float().reshape(B, H // p, W // p, -1)


def config_dict(config: PropagationConfig) -> dict:
    d = asdict(config)
    d.pop("similarity_dtype", None)
    d.pop("tile", None)
    d.pop("batched", None)
    return d
