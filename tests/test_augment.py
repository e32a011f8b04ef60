"""The device pipeline's batched augmentation (trainer/augment.py) against the worker pipeline:
the same parameters for the same sample seed, the same kernels as torchvision's, and the same
distributions of parameters and of output images over independent seeds."""
import copy

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import stats
from torchvision.transforms import v2

pytest.importorskip("kornia")

from trainer.augment import COLUMNS, TwoViewPlan, ViewPlan  # noqa: E402
from trainer.data import sample_seeds, two_view_transform  # noqa: E402

SIZE = 32
RECIPE = two_view_transform("mocov3", SIZE, crop_min=0.08)


def seeds(n: int, epoch: int = 0) -> list[int]:
    """Sample seeds as the training sampler makes them (63-bit, from a SeedSequence). Small
    consecutive integers would do worse: torch.manual_seed(0), (1), ... give correlated first
    draws, enough to fail a KS test between two such seed ranges."""
    return [int(s) for s in sample_seeds(0, epoch, n)]


def images(n: int, seed: int = 0, size: int = SIZE) -> list[Image.Image]:
    """Smooth random colour images (upsampled noise), so crops, blur and jitter all show."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(n, size // 4, size // 4, 3), dtype=np.uint8)
    return [Image.fromarray(s).resize((size, size), Image.BILINEAR) for s in small]


def as_batch(imgs) -> torch.Tensor:
    """uint8 (N, 3, H, W), as the decoded split holds images."""
    return torch.stack([torch.from_numpy(np.array(i)).permute(2, 0, 1) for i in imgs])


class WorkerRecorder:
    """The v2 recipe with each transform spied on: `record(img, seed)` -> ([(name, params)] of
    the transforms that really applied, in order; the generator's next draw afterwards)."""

    def __init__(self, compose: v2.Compose):
        self.compose, self.seen = copy.deepcopy(compose), []
        for t in self.compose.transforms:
            inner = t.transforms[0] if isinstance(t, v2.RandomApply) else t
            if type(inner) in (v2.RandomResizedCrop, v2.ColorJitter, v2.RandomGrayscale, v2.GaussianBlur,
                               v2.RandomSolarize, v2.RandomHorizontalFlip):
                inner.transform = self._spy(inner.transform, type(inner).__name__)

    def _spy(self, original, name):
        def transform(inpt, params):
            self.seen.append((name, params))
            return original(inpt, params)
        return transform

    def record(self, img, seed: int):
        self.seen = []
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.compose(img)
            after = torch.rand(1)
        return self.seen, after


def row_as_dict(plan: ViewPlan, row: torch.Tensor) -> dict[str, dict]:
    return {kind: dict(zip(COLUMNS[kind], row[cols].tolist())) for kind, _, _, cols in plan.steps}


@pytest.mark.parametrize("view", ["first", "second"])
def test_parameters_are_the_worker_pipelines_for_the_same_seed(view):
    """Exact: crop box, jitter order and factors, blur sigma and every on/off draw, and the
    generator left in the same state (the same number of draws)."""
    compose = getattr(RECIPE, view)
    plan, recorder = ViewPlan(compose), WorkerRecorder(compose)
    for seed, img in zip(seeds(40), images(40)):
        seen, after = recorder.record(img, seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            row = row_as_dict(plan, plan.sample(SIZE, SIZE))
            assert torch.rand(1) == after
        applied = {name: params for name, params in seen}
        assert row["crop"] == {k: float(v) for k, v in applied["RandomResizedCrop"].items()}
        jitter = applied.get("ColorJitter")
        assert row["jitter"]["applied"] == float(jitter is not None)
        if jitter:
            assert [row["jitter"][f"order{i}"] for i in range(4)] == jitter["fn_idx"].tolist()
            for key in ("brightness", "contrast", "saturation", "hue"):
                assert row["jitter"][key] == pytest.approx(jitter[f"{key}_factor"], abs=1e-7)
        assert row["grayscale"]["applied"] == float("RandomGrayscale" in applied)
        assert row["flip"]["applied"] == float("RandomHorizontalFlip" in applied)
        assert row["blur"]["applied"] == float("GaussianBlur" in applied)
        if "GaussianBlur" in applied:
            assert row["blur"]["sigma"] == pytest.approx(applied["GaussianBlur"]["sigma"][0], abs=1e-7)
        if "solarize" in row:
            assert row["solarize"]["applied"] == float("RandomSolarize" in applied)


def float_reference(compose: v2.Compose) -> v2.Compose:
    """The recipe on float tensors in [0, 1] (torchvision's tensor kernels): the solarize
    threshold 128 of the uint8 recipe becomes 128/255."""
    compose = copy.deepcopy(compose)
    for t in compose.transforms:
        if isinstance(t, v2.RandomSolarize):
            t.threshold = 128 / 255
    return compose


@pytest.mark.parametrize("view", ["first", "second"])
def test_batched_kernels_match_torchvision_per_image(view):
    """Same parameters, whole batch at once vs torchvision image by image on float tensors: the
    crop + resize, jitter, grayscale, blur, solarize, flip and normalize agree to float rounding,
    except at crop borders, where roi_align reads the pixel just outside the crop and
    torchvision repeats the edge."""
    compose = getattr(RECIPE, view)
    plan, reference = ViewPlan(compose), float_reference(compose)
    imgs = images(48, seed=1)
    batch = as_batch(imgs)
    rows, expected = [], []
    for seed, x in enumerate(batch):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            rows.append(plan.sample(SIZE, SIZE))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            expected.append(reference(v2.functional.to_image(x.float() / 255)))
    ours = plan.apply(batch, torch.stack(rows))
    diff = (ours - torch.stack(expected)).abs()
    assert ours.shape == (48, 3, SIZE, SIZE)
    assert diff[..., 1:-1, 1:-1].median() < 1e-4 and diff.mean() < 0.03  # normalized units, ~4 std
    assert (diff.flatten(1).mean(1) < 0.1).all()  # every image close, not just most


def test_images_of_their_own_sizes_take_the_same_kernels():
    """A streamed batch (a list of images, each cut to its crop before it turns float) gives
    what the decoded batch gives; images of other sizes get crops of their own size."""
    plan = TwoViewPlan(RECIPE)
    imgs = images(16, seed=3)
    rows = []
    for seed in seeds(16):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            rows.append(plan.sample(SIZE, SIZE))
    p1, p2 = torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])
    batch = as_batch(imgs)
    for a, b in zip(plan.apply(batch, p1, p2), plan.apply(list(batch), p1, p2)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    big = as_batch(images(2, size=96))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        row = plan.first.sample(96, 96)
    height, width = row[2].item(), row[3].item()
    assert 0.08 * 0.8 * 96**2 <= height * width and max(height, width) <= 96  # a box of the big image
    assert plan.first.apply([big[0], big[1]], torch.stack([row, row])).shape == (2, 3, SIZE, SIZE)


def output_statistics(views: torch.Tensor) -> dict[str, np.ndarray]:
    """Per-image statistics that each augmentation moves: brightness, contrast, colourfulness,
    hue (channel balance), sharpness (blur), left-right balance (flip of an asymmetric input), in [0, 1] pixel units."""
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    x = views * std + mean
    gray = x.mean(1)
    stats_ = {
        "brightness": x.mean((1, 2, 3)).numpy(),
        "contrast": gray.flatten(1).std(1).numpy(),
        "colour": (x - gray[:, None]).abs().mean((1, 2, 3)).numpy(),
        "red_minus_blue": (x[:, 0] - x[:, 2]).mean((1, 2)).numpy(),  # hue
        "green_minus_magenta": (x[:, 1] - (x[:, 0] + x[:, 2]) / 2).mean((1, 2)).numpy(),
        "sharpness": (gray[:, :, 1:] - gray[:, :, :-1]).abs().mean((1, 2)).numpy(),
        "left_minus_right": (x[..., : SIZE // 2].mean((1, 2, 3)) - x[..., SIZE // 2:].mean((1, 2, 3))).numpy(),
    }
    # rounded: a grayscale view's colour is 0 up to float noise that differs between pipelines
    return {name: np.round(values, 4) for name, values in stats_.items()}


def test_view_distributions_match_the_worker_pipeline_over_independent_seeds():
    """Kolmogorov-Smirnov, 500 views per pipeline and view, independent seeds: the distribution
    of every output statistic agrees with the PIL worker pipeline's (p > 0.001), and a recipe
    with the jitter's hue range doubled is told apart (the test has power)."""
    n = 500
    img = images(1, seed=2)[0]
    ramp = np.linspace(0.3, 1.0, SIZE)[None, :, None]  # brighter on the right: flips show
    img = Image.fromarray((np.array(img) * ramp).astype(np.uint8))
    plan = TwoViewPlan(RECIPE)
    source = as_batch([img]).expand(n, -1, -1, -1)
    rows = []
    for seed in seeds(n, epoch=0):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            rows.append(plan.sample(SIZE, SIZE))
    device_views = plan.apply(source, torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows]))
    worker_views = [[], []]
    for seed in seeds(n, epoch=1):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for out, view in zip(worker_views, RECIPE(img)):
                out.append(view)
    for ours, theirs in zip(device_views, worker_views):
        a, b = output_statistics(ours), output_statistics(torch.stack(theirs))
        for name in a:
            assert stats.ks_2samp(a[name], b[name]).pvalue > 1e-3, name

    wrong = copy.deepcopy(RECIPE.first)
    wrong.transforms[1].transforms[0].hue = (-0.5, 0.5)
    wrong_plan = ViewPlan(wrong)
    wrong_rows = []
    for seed in seeds(n, epoch=0):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            wrong_rows.append(wrong_plan.sample(SIZE, SIZE))
    wrong_views = wrong_plan.apply(source, torch.stack(wrong_rows))
    pvalues = [stats.ks_2samp(output_statistics(wrong_views)[k], output_statistics(torch.stack(worker_views[0]))[k]).pvalue
               for k in ("red_minus_blue", "green_minus_magenta")]
    assert min(pvalues) < 1e-3


def test_parameter_distributions_follow_the_official_recipe():
    """Over 2,000 seeds: crop area fraction in [0.08, 1] and aspect ratio in [3/4, 4/3] with the
    same distribution as the worker pipeline's recorded crops (KS); on/off rates within 4
    standard errors of augmentation1 / augmentation2 (jitter 0.8, grayscale 0.2, blur 1.0 / 0.1,
    solarize 0 / 0.2, flip 0.5); jitter factors uniform on ColorJitter(0.4, 0.4, 0.2, 0.1)'s
    ranges (brightness and contrast 0.6-1.4, saturation 0.8-1.2, hue -0.1-0.1), all 24 orders."""
    n = 2000
    plan = TwoViewPlan(RECIPE)
    rows = [[], []]
    for seed in seeds(n, epoch=0):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for out, row in zip(rows, plan.sample(SIZE, SIZE)):
                out.append(row)
    recorder, img = WorkerRecorder(RECIPE.first), images(1)[0]
    worker_crops = [dict(recorder.record(img, seed)[0])["RandomResizedCrop"] for seed in seeds(400, epoch=1)]
    rates = {"first": dict(jitter=0.8, grayscale=0.2, blur=1.0, flip=0.5),
             "second": dict(jitter=0.8, grayscale=0.2, blur=0.1, solarize=0.2, flip=0.5)}
    for view, view_rows in zip(("first", "second"), rows):
        view_plan = getattr(plan, view)
        table = {kind: torch.stack(view_rows)[:, cols] for kind, _, _, cols in view_plan.steps}
        crop = table["crop"]
        area = (crop[:, 2] * crop[:, 3] / SIZE**2).numpy()
        assert area.min() >= 0.08 * 0.8 and area.max() <= 1.0  # rounding to whole pixels
        ratio = (crop[:, 3] / crop[:, 2]).numpy()
        worker_area = np.array([c["height"] * c["width"] / SIZE**2 for c in worker_crops])
        assert stats.ks_2samp(area, worker_area).pvalue > 1e-3
        assert np.median(np.log(ratio)) == pytest.approx(0, abs=0.05)
        for kind, p in rates[view].items():
            rate = table[kind][:, 0].mean().item()
            assert abs(rate - p) <= 4 * np.sqrt(p * (1 - p) / n) + 1e-9, (view, kind, rate)
        assert "solarize" in table or view == "first"
        jitter = table["jitter"][table["jitter"][:, 0] > 0]
        for column, (low, high) in zip(range(5, 9), [(0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1)]):
            values = ((jitter[:, column] - low) / (high - low)).numpy()
            assert stats.kstest(values, "uniform").pvalue > 1e-3
        orders = {tuple(o) for o in jitter[:, 1:5].long().tolist()}
        assert len(orders) == 24  # every order of the four colour operations occurs


def test_plain_transform_is_a_centre_square():
    """data.augment=none through the device pipeline: the deterministic centre crop."""
    plan = TwoViewPlan(two_view_transform("none", 16, 0.08))
    row1, row2 = plan.sample(24, 40)
    assert row1.tolist() == row2.tolist() == [0.0, 8.0, 24.0, 24.0]
    img = images(1, size=24)[0].resize((40, 24))
    x = as_batch([img])
    views = plan.apply(x, row1[None], row2[None])
    expected = plan.first.steps and two_view_transform("none", 16, 0.08).first(img)
    assert torch.equal(views[0], views[1]) and (views[0][0] - expected).abs().mean() < 0.05


def test_unsupported_transforms_are_refused():
    with pytest.raises(ValueError, match="cannot run RandomRotation"):
        ViewPlan(v2.Compose([v2.RandomResizedCrop(8), v2.RandomRotation(10)]))
    with pytest.raises(ValueError, match="starts with RandomResizedCrop"):
        ViewPlan(v2.Compose([v2.RandomHorizontalFlip()]))
