"""The MoCo v3 two-view augmentation on whole batches on the training device (data.pipeline=device).

Parameters per sample, pixels per batch. `ViewPlan` reads one view's torchvision v2 recipe
(`trainer.data.mocov3_view`, the official augmentation1 / augmentation2) and draws a sample's
parameters with torchvision's own transforms: `make_params` of RandomResizedCrop, ColorJitter
and GaussianBlur, and the `torch.rand(1) >= p` test with which v2.RandomApply, RandomGrayscale,
RandomSolarize and RandomHorizontalFlip skip, in the order a v2.Compose draws them. Under a
sample's seed it therefore gives exactly the parameters the worker pipeline uses for that
sample, so the per-sample seeding (reproducible, resumable, independent of workers and world
size) carries over unchanged. Drawing is cheap (about 0.3 ms a sample) and runs in the
DataLoader workers; the rows travel as one float tensor per view.

`ViewPlan.apply` then runs the recipe on a batch on its device with per-sample parameters:
crop + resize by `torchvision.ops.roi_align` (bilinear at the same sample points as
torchvision's resize; several samples per output pixel when shrinking, which stands in for its
antialiasing), colour jitter by the kornia.enhance functions that kornia's ColorJitter uses
(torchvision's formulas), each sample with its own random order of the four, grayscale by
kornia.color, blur by kornia.filters.gaussian_blur2d (same kernel size and sigma), solarize by
kornia.enhance.solarize, then flip and normalize. Which samples a step touches is read from
the parameter rows on the host, so the batch is only indexed, never tested on the device: no
host sync. Pixels stay float in [0, 1] between steps, where the worker pipeline rounds to
uint8 after each PIL operation.

kornia is an optional dependency (`pip install stabilitylab[kornia]`), imported here only;
without it `data.pipeline=device` falls back to the workers pipeline with a warning.
"""
from __future__ import annotations

import torch
from torchvision.ops import roi_align
from torchvision.transforms import v2

try:
    import kornia
except ImportError:  # trainer.data.build_train_loader then runs the workers pipeline
    kornia = None

class _CentreSquare:
    """v2.Resize(S) + v2.CenterCrop(S) (the plain transform of data.augment=none) as a crop: the
    centred square of the shorter side, resized to S x S."""

    def __init__(self, resize: v2.Resize, centre: v2.CenterCrop):
        side = resize.size if isinstance(resize.size, int) else resize.size[0]
        if resize.max_size is not None or list(centre.size) != [side, side]:
            raise ValueError("data.pipeline=device runs Resize(S) + CenterCrop(S) only")
        self.size = (side, side)

    def make_params(self, flat_inputs) -> dict:
        height, width = v2.query_size(flat_inputs)
        side = min(height, width)
        return dict(top=(height - side) // 2, left=(width - side) // 2, height=side, width=side)


# parameter columns of each step kind (a step that can be skipped has `applied` first)
COLUMNS = {
    "crop": ("top", "left", "height", "width"),
    "jitter": ("applied", "order0", "order1", "order2", "order3",
               "brightness", "contrast", "saturation", "hue"),
    "grayscale": ("applied",),
    "blur": ("applied", "sigma"),
    "solarize": ("applied",),
    "flip": ("applied",),
}
_KIND = {v2.RandomResizedCrop: "crop", v2.ColorJitter: "jitter", v2.RandomGrayscale: "grayscale",
         v2.GaussianBlur: "blur", v2.RandomSolarize: "solarize", v2.RandomHorizontalFlip: "flip"}
_PASSIVE = (v2.ToImage, v2.ToDtype, v2.ToPureTensor)  # conversions the batch does not need


class ViewPlan:
    """One view's v2.Compose as steps with fixed parameter columns, drawn per sample, applied per batch."""

    def __init__(self, compose: v2.Compose):
        self.steps: list[tuple[str, v2.Transform, float | None, slice]] = []
        self.mean = self.std = None
        width = 0
        transforms = list(compose.transforms)
        if (len(transforms) > 1 and isinstance(transforms[0], v2.Resize)
                and isinstance(transforms[1], v2.CenterCrop)):  # data.augment=none
            transforms[:2] = [_CentreSquare(transforms[0], transforms[1])]
        for t in transforms:
            p = None
            if isinstance(t, v2.RandomApply):
                if len(t.transforms) != 1:
                    raise ValueError("data.pipeline=device runs RandomApply of one transform only")
                p, t = t.p, t.transforms[0]
            elif isinstance(t, (v2.RandomGrayscale, v2.RandomSolarize, v2.RandomHorizontalFlip)):
                p = t.p
            if isinstance(t, v2.Normalize):
                self.mean, self.std = list(t.mean), list(t.std)
                continue
            if isinstance(t, _PASSIVE):
                continue
            kind = "crop" if isinstance(t, _CentreSquare) else _KIND.get(type(t))
            if kind is None:
                raise ValueError(f"data.pipeline=device cannot run {type(t).__name__}; "
                                 f"use data.pipeline=workers")
            n = len(COLUMNS[kind])
            self.steps.append((kind, t, p, slice(width, width + n)))
            width += n
        if not self.steps or self.steps[0][0] != "crop":
            raise ValueError("data.pipeline=device needs a view that starts with RandomResizedCrop "
                             "(or Resize + CenterCrop)")
        self.width = width
        self.size = tuple(self.steps[0][1].size)
        if len(self.size) == 1:
            self.size = self.size * 2

    # ------------------------------------------------------------------ parameters

    def sample(self, height: int, width: int) -> torch.Tensor:
        """One sample's parameter row for an image of height x width, drawn from the global
        torch generator exactly as the v2.Compose would draw them."""
        stub = torch.empty(1).expand(3, height, width)  # gives the size, allocates nothing
        row = torch.zeros(self.width)
        for kind, t, p, cols in self.steps:
            applied = p is None or not bool(torch.rand(1) >= p)
            if not applied:
                continue
            values = {"applied": 1.0}
            if kind in ("crop", "jitter", "blur"):
                params = t.make_params([stub])
                if kind == "jitter":
                    values.update({f"order{i}": float(o) for i, o in enumerate(params["fn_idx"])})
                    values.update(brightness=params["brightness_factor"], contrast=params["contrast_factor"],
                                  saturation=params["saturation_factor"], hue=params["hue_factor"])
                elif kind == "blur":
                    values["sigma"] = params["sigma"][0]
                else:
                    values.update(params)
            row[cols] = torch.tensor([float(values[c]) for c in COLUMNS[kind]])
        return row

    # ------------------------------------------------------------------ pixels

    def apply(self, images, params: torch.Tensor) -> torch.Tensor:
        """The view of each image: float (B, 3, *size), normalized.

        images: uint8 on the device, (B, 3, H, W) or a list of B (3, h_i, w_i);
        params: (B, width) rows from `sample`, on the CPU.
        """
        params = params.cpu()
        crop = params[:, self.steps[0][3]]
        x = self._crop(images, crop)
        for kind, t, _, cols in self.steps[1:]:
            p = params[:, cols]
            rows = p[:, 0].nonzero().flatten()  # a CPU tensor: no device sync
            if not len(rows):
                continue
            if kind == "jitter":
                x = self._jitter(x, p)
                continue
            on_device = rows.to(x.device, non_blocking=True)
            part = x.index_select(0, on_device)
            if kind == "grayscale":
                part = kornia.color.rgb_to_grayscale(part).expand_as(part)
            elif kind == "blur":
                sigma = p[rows, 1:2].expand(-1, 2).to(x.device, x.dtype, non_blocking=True)
                part = kornia.filters.gaussian_blur2d(part, tuple(t.kernel_size), sigma, border_type="reflect")
            elif kind == "solarize":  # the recipe's threshold is in uint8 units (PIL in the workers)
                part = kornia.enhance.solarize(part, thresholds=t.threshold / 255)
            elif kind == "flip":
                part = part.flip(-1)
            x = x.index_copy(0, on_device, part)
        if self.mean is not None:
            x = v2.functional.normalize(x, self.mean, self.std)
        return x

    def _crop(self, images, crop: torch.Tensor) -> torch.Tensor:
        """Crop boxes (top, left, height, width) resized to the view size, float in [0, 1], by
        roi_align in pixel-centre ("aligned") coordinates, as torchvision's crop + bilinear
        resize samples. Images of their own sizes (a list) are cut to their box plus a pixel of
        margin before they turn float, so a large photo costs what its crop costs."""
        top, left, height, width = crop.unbind(1)
        boxes = torch.stack([left, top, left + width, top + height], dim=1)
        if isinstance(images, torch.Tensor):
            x = images.float().div_(255)
            index = torch.arange(len(boxes), dtype=boxes.dtype)[:, None]
            boxes = torch.cat([index, boxes], dim=1).to(x.device, x.dtype, non_blocking=True)
            return roi_align(x, boxes, self.size, spatial_scale=1.0, sampling_ratio=-1, aligned=True)
        views = []
        for image, (t, l, h, w) in zip(images, crop.long().tolist()):
            y0, x0 = max(t - 1, 0), max(l - 1, 0)
            part = image[:, y0:t + h + 1, x0:l + w + 1].float().div_(255)
            box = torch.tensor([[l - x0, t - y0, l - x0 + w, t - y0 + h]], dtype=part.dtype, device=part.device)
            views.append(roi_align(part[None], [box], self.size, spatial_scale=1.0, sampling_ratio=-1,
                                   aligned=True))
        return torch.cat(views)

    @staticmethod
    def _jitter(x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """Brightness, contrast, saturation and hue, each sample in its own random order:
        at each of the four positions, every op runs on the samples that have it there."""
        ops = (kornia.enhance.adjust_brightness_accumulative,
               kornia.enhance.adjust_contrast_with_mean_subtraction,
               kornia.enhance.adjust_saturation_with_gray_subtraction,
               lambda image, factor: kornia.enhance.adjust_hue(image, factor * 2 * torch.pi))
        applied = p[:, 0] > 0
        order, factors = p[:, 1:5].long(), p[:, 5:9]
        for position in range(4):
            for op_index, op in enumerate(ops):
                rows = (applied & (order[:, position] == op_index)).nonzero().flatten()
                if not len(rows):
                    continue
                on_device = rows.to(x.device, non_blocking=True)
                factor = factors[rows, op_index].to(x.device, x.dtype, non_blocking=True)
                x = x.index_copy(0, on_device, op(x.index_select(0, on_device), factor))
        return x


class TwoViewPlan:
    """The two views of `trainer.data.TwoViews` as plans: `sample` draws both rows of a sample
    (view 1 first, as TwoViews calls them), `apply` makes both batches."""

    def __init__(self, two_views):
        self.first, self.second = ViewPlan(two_views.first), ViewPlan(two_views.second)

    def sample(self, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.first.sample(height, width), self.second.sample(height, width)

    def apply(self, images, params1: torch.Tensor, params2: torch.Tensor):
        return self.first.apply(images, params1), self.second.apply(images, params2)
