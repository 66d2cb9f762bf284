"""Reconcile image placeholder tokens with ``image_grid_thw`` after a prompt was truncated."""
from __future__ import annotations

import torch

__all__ = ["reconcile_image_tokens"]


def reconcile_image_tokens(input_ids: torch.Tensor, image_grid_thw, *, image_token_id: int, spatial_merge_size: int = 2,
                           truncated_side: str = "left"):
    """Which tokens and which images to keep after ``input_ids`` was cut on one side.

    ``image_grid_thw [N, 3]`` describes the images of the *uncut* prompt in order; image ``i`` had
    ``n_i = t*h*w / spatial_merge_size**2`` consecutive placeholder tokens. A cut on the left removes
    the first images (and maybe the head of one more); a cut on the right removes the last images
    (and maybe the tail of one more). This keeps exactly the images whose placeholders all survived
    and drops the surviving tokens of the partially cut image, so the kept tokens and kept grids pair
    up in order.

    Args:
        input_ids: ``[S]`` token ids after truncation.
        image_grid_thw: ``[N, 3]`` grids of the prompt before truncation.
        image_token_id: the image placeholder id.
        spatial_merge_size: patches merged per side into one token.
        truncated_side: ``"left"`` or ``"right"``.

    Returns ``(token_keep [S] bool, image_keep [N] bool)``: ``input_ids[token_keep]`` and
    ``image_grid_thw[image_keep]`` belong together.

    Raises ValueError when the placeholder tokens cannot be the result of such a cut: more
    placeholders than the grids describe, a partial image not at the cut edge, or an image's
    tokens split by other tokens.
    """
    if truncated_side not in ("left", "right"):
        raise ValueError(f"truncated_side must be 'left' or 'right', got {truncated_side!r}")
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 1 or input_ids.is_floating_point():
        raise ValueError(f"input_ids must be a 1-D int tensor [S] (one prompt), got {getattr(input_ids, 'shape', input_ids)!r}")
    grid = torch.as_tensor(image_grid_thw, device=input_ids.device).reshape(-1, 3).long()
    if (grid <= 0).any() or (grid[:, 1:] % spatial_merge_size).any():
        raise ValueError(f"image_grid_thw must be positive with h, w divisible by {spatial_merge_size}, got {grid.tolist()}")
    sizes = grid.prod(1) // spatial_merge_size ** 2
    N, S = sizes.numel(), input_ids.numel()
    is_img = input_ids == image_token_id
    where = torch.nonzero(is_img).squeeze(1)
    M, total = where.numel(), int(sizes.sum())
    if M > total:
        raise ValueError(f"{M} image placeholder tokens but image_grid_thw describes only {total}: truncation only "
                         "removes tokens, so input_ids and image_grid_thw do not belong together")
    # sizes in the order the cut eats them: from the front for a left cut, from the back for a right cut
    ordered = sizes if truncated_side == "left" else sizes.flip(0)
    removed = total - M  # placeholder tokens the cut took
    ends = torch.cumsum(ordered, 0)
    n_gone = int((ends <= removed).sum())  # images entirely cut away
    partial = removed - (int(ends[n_gone - 1]) if n_gone else 0)  # tokens cut from the next image
    image_keep = torch.ones(N, dtype=torch.bool, device=input_ids.device)
    n_drop = n_gone + (1 if partial else 0)
    if truncated_side == "left":
        image_keep[:n_drop] = False
    else:
        image_keep[N - n_drop:] = False
    token_keep = torch.ones(S, dtype=torch.bool, device=input_ids.device)
    orphan = int(ordered[n_gone]) - partial if partial else 0  # surviving tokens of the partial image
    if orphan:
        orphan_idx = where[:orphan] if truncated_side == "left" else where[M - orphan:]
        edge_ok = int(orphan_idx[0]) == 0 if truncated_side == "left" else int(orphan_idx[-1]) == S - 1
        if not edge_ok or int(orphan_idx[-1] - orphan_idx[0]) + 1 != orphan:
            raise ValueError(
                f"{orphan} placeholder tokens belong to an image cut by the {truncated_side} truncation, but they are not "
                f"one run at the {truncated_side} edge of input_ids: the prompt was not simply truncated on that side")
        token_keep[orphan_idx] = False
    # every kept image must be one contiguous run
    kept_sizes = sizes[image_keep]
    kept_where = where[orphan:] if truncated_side == "left" else where[: M - orphan]
    if kept_sizes.numel():
        stops = torch.cumsum(kept_sizes, 0)
        first, last = kept_where[stops - kept_sizes], kept_where[stops - 1]
        bad = torch.nonzero(last - first + 1 != kept_sizes)
        if bad.numel():
            i = int(torch.nonzero(image_keep)[int(bad[0, 0])])
            raise ValueError(f"the placeholder tokens of image {i} ({int(sizes[i])} tokens) are split by other tokens: "
                             "input_ids and image_grid_thw do not belong together")
    return token_keep, image_keep
