"""Batched, seeded image augmentations on the images' own device (DESIGN.md §3).

One call augments a whole batch x [n, C, H, W] (float, values in [0, 1]) with no Python loop
over images. Every random draw comes from one torch.Generator on x's device, so the same
generator state gives the same views, bit for bit on a given device.

  geometry  one affine_grid + grid_sample per batch. Coordinates are normalised to [-1, 1]; the
            sampling matrix of each view maps output coordinates to input coordinates:
                x_in = Crop · Affine⁻¹ · Flip · x_out
            Crop     random resized crop: area fraction s ~ U(crop_scale), aspect r ~ logU(crop_ratio)
                     relative to the image's own aspect, half-sizes (√(s·r), √(s/r)) clamped to 1,
                     centre uniform over the positions that keep the crop inside the image.
            Affine   rotation θ, x-shear φ, isotropic zoom z and translation t (a fraction of the
                     image size), applied in pixel units so a rotation stays a rotation when H ≠ W.
            Flip     x → −x with probability flip_prob.
  colour    3 channels only. With probability colour_jitter_prob per image: brightness x·b,
            contrast c·x + (1−c)·mean(gray(x)), saturation s·x + (1−s)·gray(x), each factor
            ~ U(max(0, 1 − strength), 1 + strength), in that fixed order; then gray(x) replaces x
            with probability grayscale_prob. gray = 0.299 R + 0.587 G + 0.114 B.
  noise     x + noise_std · N(0, 1).
Each stage clamps to [0, 1]. A config without geometry skips grid_sample, so the identity config
returns its input exactly (as a copy). Work is done in float32 (float64 for float64 inputs) and
cast back, so half-precision images are fine.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import validate

_LUMA = (0.299, 0.587, 0.114)
_PADDING_MODES = ("zeros", "border", "reflection")
_INTERPOLATIONS = ("bilinear", "nearest", "bicubic")


@dataclass(frozen=True)
class AugmentConfig:
    """What one augmented view may look like. Ranges are (low, high), drawn uniformly per view.

    crop_scale       area of the crop as a fraction of the image, in (0, 1]
    crop_ratio       crop aspect ratio relative to the image's (1 = same shape), drawn log-uniformly
    rotation_degrees rotation angle ~ U(−r, r)
    translate        shift ~ U(−t, t) as a fraction of the image width (x) and height (y)
    zoom             isotropic scale factor (> 1 enlarges the content)
    shear_degrees    x-shear angle ~ U(−s, s)
    flip_prob        probability of a horizontal flip
    brightness, contrast, saturation   colour-jitter strengths (torchvision's meaning); RGB only
    colour_jitter_prob                 probability an image gets the colour jitter at all
    grayscale_prob   probability an RGB image is turned gray (kept 3-channel)
    noise_std        standard deviation of additive Gaussian noise
    padding_mode     grid_sample's fill outside the image: "zeros", "border" or "reflection"
    interpolation    grid_sample's mode: "bilinear", "nearest" or "bicubic"
    """

    crop_scale: tuple[float, float] = (1.0, 1.0)
    crop_ratio: tuple[float, float] = (1.0, 1.0)
    rotation_degrees: float = 0.0
    translate: float = 0.0
    zoom: tuple[float, float] = (1.0, 1.0)
    shear_degrees: float = 0.0
    flip_prob: float = 0.0
    brightness: float = 0.0
    contrast: float = 0.0
    saturation: float = 0.0
    colour_jitter_prob: float = 1.0
    grayscale_prob: float = 0.0
    noise_std: float = 0.0
    padding_mode: str = "border"
    interpolation: str = "bilinear"

    def __post_init__(self):
        def check_range(name, low_high, low_bound, high_bound=math.inf, low_open=False):
            low, high = low_high
            if not (math.isfinite(low) and math.isfinite(high)):
                raise ValueError(f"AugmentConfig.{name}={low_high} must be finite")
            if not (low <= high):
                raise ValueError(f"AugmentConfig.{name}: low {low} > high {high}")
            too_low = low <= low_bound if low_open else low < low_bound
            if too_low or high > high_bound:
                bracket = "(" if low_open else "["
                raise ValueError(f"AugmentConfig.{name}={low_high} must lie in "
                                 f"{bracket}{low_bound}, {high_bound}]")

        def check_nonnegative(name, value, high_bound=math.inf):
            # numpy / torch scalars are numbers.Real too, and are stored as float
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (
                    math.isfinite(value) and 0.0 <= value <= high_bound):
                bound = f"{high_bound}]" if math.isfinite(high_bound) else "inf), finite"
                raise ValueError(f"AugmentConfig.{name}={value!r} must be a number in [0, {bound}")
            object.__setattr__(self, name, float(value))

        for name in ("crop_scale", "crop_ratio", "zoom"):
            value = getattr(self, name)
            if not (isinstance(value, (tuple, list)) and len(value) == 2
                    and all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in value)):
                raise ValueError(f"AugmentConfig.{name} must be a (low, high) pair of numbers, got {value!r}")
            object.__setattr__(self, name, (float(value[0]), float(value[1])))
        check_range("crop_scale", self.crop_scale, 0.0, 1.0, low_open=True)
        check_range("crop_ratio", self.crop_ratio, 0.0, low_open=True)
        check_range("zoom", self.zoom, 0.0, low_open=True)
        check_nonnegative("rotation_degrees", self.rotation_degrees, 180.0)
        check_nonnegative("translate", self.translate, 1.0)
        check_nonnegative("shear_degrees", self.shear_degrees, 60.0)
        check_nonnegative("brightness", self.brightness)
        check_nonnegative("contrast", self.contrast)
        check_nonnegative("saturation", self.saturation)
        check_nonnegative("noise_std", self.noise_std)
        for name in ("flip_prob", "colour_jitter_prob", "grayscale_prob"):
            check_nonnegative(name, getattr(self, name), 1.0)
        if self.padding_mode not in _PADDING_MODES:
            raise ValueError(f"AugmentConfig.padding_mode={self.padding_mode!r}; "
                             f"choose one of {_PADDING_MODES}")
        if self.interpolation not in _INTERPOLATIONS:
            raise ValueError(f"AugmentConfig.interpolation={self.interpolation!r}; "
                             f"choose one of {_INTERPOLATIONS}")

    # ---- presets -------------------------------------------------------------------------
    @classmethod
    def identity(cls) -> "AugmentConfig":
        """No change at all: every view equals its source image."""
        return cls()

    @classmethod
    def omniglot(cls) -> "AugmentConfig":
        """Grayscale characters (28×28): mild crop, small affine, no flip (mirrored glyphs are
        other characters), no colour."""
        return cls(crop_scale=(0.7, 1.0), crop_ratio=(0.9, 1.1), rotation_degrees=15.0,
                   translate=0.1, zoom=(0.9, 1.1), shear_degrees=10.0, padding_mode="border")

    @classmethod
    def rgb(cls) -> "AugmentConfig":
        """Natural RGB images (miniImageNet-style 84×84): SimCLR-like crop, flip, colour jitter
        with probability 0.8 and random grayscale 0.2."""
        return cls(crop_scale=(0.2, 1.0), crop_ratio=(3 / 4, 4 / 3), flip_prob=0.5,
                   brightness=0.4, contrast=0.4, saturation=0.4, colour_jitter_prob=0.8,
                   grayscale_prob=0.2, padding_mode="reflection")

    # ---- what the config does ------------------------------------------------------------
    @property
    def has_geometry(self) -> bool:
        return (self.crop_scale != (1.0, 1.0) or self.crop_ratio != (1.0, 1.0)
                or self.rotation_degrees > 0 or self.translate > 0 or self.zoom != (1.0, 1.0)
                or self.shear_degrees > 0 or self.flip_prob > 0)

    @property
    def has_colour(self) -> bool:
        jitter = self.colour_jitter_prob > 0 and (self.brightness > 0 or self.contrast > 0
                                                  or self.saturation > 0)
        return jitter or self.grayscale_prob > 0


def check_generator(generator: torch.Generator | None, device: torch.device, what: str = "images"):
    """Raise a ValueError unless `generator` (None = torch's default) can draw on `device`."""
    if generator is None:
        return
    if not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator or None, "
                         f"got {type(generator).__name__}")
    gen_device = generator.device
    same_type = gen_device.type == device.type
    same_index = gen_device.index is None or device.index is None or gen_device.index == device.index
    if not (same_type and same_index):
        raise ValueError(f"generator is on {gen_device} but the {what} are on {device}; "
                         f"make it with torch.Generator(device={str(device)!r})")


def _uniform(u: torch.Tensor, low: float, high: float) -> torch.Tensor:
    return low + (high - low) * u


def random_affine_matrices(batch: int, height: int, width: int, config: AugmentConfig,
                           generator: torch.Generator | None = None,
                           device: torch.device | str = "cpu",
                           dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Sampling matrices theta [batch, 2, 3] for F.affine_grid (align_corners=False).

    theta maps normalised output coordinates to normalised input coordinates:
        theta = [Crop · P⁻¹ L⁻¹ P · Flip | c − Crop · P⁻¹ L⁻¹ P · t_n]
    with Crop = diag(half-widths), c the crop centre, L = R(θ) · Shear(φ) · z the forward affine in
    pixel units, P = diag(W, H)/2 (normalised → pixel units) and t_n = 2·translate fractions.
    """
    device = torch.device(device)
    u = torch.rand(batch, 10, generator=generator, device=device, dtype=dtype)
    area = _uniform(u[:, 0], *config.crop_scale)
    log_ratio = _uniform(u[:, 1], math.log(config.crop_ratio[0]), math.log(config.crop_ratio[1]))
    ratio = torch.exp(log_ratio)
    half_w = torch.sqrt(area * ratio).clamp(max=1.0)
    half_h = torch.sqrt(area / ratio).clamp(max=1.0)
    centre_x = _uniform(u[:, 2], -1.0, 1.0) * (1.0 - half_w)
    centre_y = _uniform(u[:, 3], -1.0, 1.0) * (1.0 - half_h)

    angle = torch.deg2rad(_uniform(u[:, 4], -config.rotation_degrees, config.rotation_degrees))
    shear = torch.tan(torch.deg2rad(_uniform(u[:, 5], -config.shear_degrees, config.shear_degrees)))
    zoom = _uniform(u[:, 6], *config.zoom)
    shift_x = 2.0 * _uniform(u[:, 7], -config.translate, config.translate)
    shift_y = 2.0 * _uniform(u[:, 8], -config.translate, config.translate)
    flip = torch.where(u[:, 9] < config.flip_prob, -1.0, 1.0).to(dtype)

    # L⁻¹ = (1/z) · Shear(φ)⁻¹ · R(−θ) in pixel units, Shear(φ)⁻¹ = [[1, −tan φ], [0, 1]].
    cos, sin = torch.cos(angle), torch.sin(angle)
    rot_inv = torch.stack([torch.stack([cos, sin], -1), torch.stack([-sin, cos], -1)], -2)
    shear_inv = torch.zeros(batch, 2, 2, device=device, dtype=dtype)
    shear_inv[:, 0, 0] = 1.0
    shear_inv[:, 1, 1] = 1.0
    shear_inv[:, 0, 1] = -shear
    inverse_pixels = shear_inv @ rot_inv / zoom[:, None, None]
    to_pixels = torch.tensor([width / 2.0, height / 2.0], device=device, dtype=dtype)
    inverse_normalised = inverse_pixels * to_pixels[None, None, :] / to_pixels[None, :, None]

    crop = torch.stack([half_w, half_h], -1)                            # [batch, 2]
    linear = crop[:, :, None] * inverse_normalised                      # Crop · P⁻¹ L⁻¹ P
    shift = torch.stack([shift_x, shift_y], -1)
    offset = torch.stack([centre_x, centre_y], -1) - (linear @ shift[:, :, None])[:, :, 0]
    linear = linear * torch.stack([flip, torch.ones_like(flip)], -1)[:, None, :]
    return torch.cat([linear, offset[:, :, None]], dim=-1)


def _gray(x: torch.Tensor) -> torch.Tensor:
    """[n, 3, H, W] → luminance [n, 1, H, W]."""
    weights = torch.tensor(_LUMA, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x * weights).sum(dim=1, keepdim=True)


def _jitter_factor(u: torch.Tensor, strength: float, applied: torch.Tensor) -> torch.Tensor:
    factor = _uniform(u, max(0.0, 1.0 - strength), 1.0 + strength)
    return torch.where(applied, factor, torch.ones_like(factor)).view(-1, 1, 1, 1)


def _colour(x: torch.Tensor, config: AugmentConfig, generator) -> torch.Tensor:
    u = torch.rand(x.shape[0], 5, generator=generator, device=x.device, dtype=x.dtype)
    applied = u[:, 0] < config.colour_jitter_prob
    if config.brightness > 0:
        x = (x * _jitter_factor(u[:, 1], config.brightness, applied)).clamp(0.0, 1.0)
    if config.contrast > 0:
        factor = _jitter_factor(u[:, 2], config.contrast, applied)
        mean = _gray(x).mean(dim=(-3, -2, -1), keepdim=True)
        x = (factor * x + (1.0 - factor) * mean).clamp(0.0, 1.0)
    if config.saturation > 0:
        factor = _jitter_factor(u[:, 3], config.saturation, applied)
        x = (factor * x + (1.0 - factor) * _gray(x)).clamp(0.0, 1.0)
    if config.grayscale_prob > 0:
        to_gray = (u[:, 4] < config.grayscale_prob).view(-1, 1, 1, 1)
        x = torch.where(to_gray, _gray(x).expand_as(x), x)
    return x


def augment(images: torch.Tensor, config: AugmentConfig,
            generator: torch.Generator | None = None) -> torch.Tensor:
    """One random view of every image: images [n, C, H, W] float in [0, 1] → same shape, dtype,
    device. `generator` (on images' device; None = torch's default) drives every draw."""
    if not isinstance(config, AugmentConfig):
        raise ValueError(f"config must be an AugmentConfig, got {type(config).__name__}")
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a [n, C, H, W] tensor, got {shape}")
    if not images.is_floating_point():
        raise ValueError(f"images must be floating point in [0, 1], got {images.dtype}; "
                         f"convert uint8 with images.float() / 255")
    check_generator(generator, images.device)
    batch, channels, height, width = images.shape
    if config.has_colour and channels != 3:
        raise ValueError(f"colour jitter / grayscale need 3-channel (RGB) images, got {channels} "
                         f"channels; use a config without them (e.g. AugmentConfig.omniglot())")
    if batch == 0 or images.numel() == 0:
        return images.clone()
    if validate.values_readable():
        # the views are clamped to [0, 1]: a 0..255 pool became all 1.0 under any geometry
        low, high = (float(v) for v in torch.aminmax(images))
        if not (low >= 0.0 and high <= 1.0):
            raise ValueError(f"images must lie in [0, 1], got values in [{low}, {high}]"
                             + ("; pass ImageSet.float() (uint8 / 255), not images.float()" if high > 1 else ""))

    work_dtype = torch.float64 if images.dtype == torch.float64 else torch.float32
    x = images.to(work_dtype)
    if config.has_geometry:
        theta = random_affine_matrices(batch, height, width, config, generator,
                                       images.device, work_dtype)
        grid = F.affine_grid(theta, [batch, channels, height, width], align_corners=False)
        x = F.grid_sample(x, grid, mode=config.interpolation, padding_mode=config.padding_mode,
                          align_corners=False).clamp(0.0, 1.0)
    if config.has_colour:
        x = _colour(x, config, generator)
    if config.noise_std > 0:
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=work_dtype)
        x = (x + config.noise_std * noise).clamp(0.0, 1.0)
    if x.data_ptr() == images.data_ptr():
        x = x.clone()
    return x.to(images.dtype)
