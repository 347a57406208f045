"""Choosing the one thing no gradient can tell: an image's contrast.

A model that normalises its input with fixed constants, then applies a bias-free first
convolution and a group (or instance, or layer) norm, computes exactly the same output,
and so exactly the same update, for every image on the ray ``center + a * (x - center)``,
``a > 0``. A gradient-inversion attack can only ever recover the *shape* of the deviation
``x - center``; its magnitude (the image's contrast) is a free gauge the attacker must
choose from prior knowledge.

:class:`ContrastPrior` chooses it from reference images the attacker holds (a public
training split, never the victims). A shape can only be stretched so far before it leaves
the pixel box; call that its *box limit*. The ``k`` references whose unit-RMS shapes are
most similar to the reconstruction's vote, by geometric mean, on how close to its box limit
an X-ray of that shape comes, and the reconstruction is stretched that far. Voting on the
fraction rather than on the RMS itself carries over to atypical victims: an image with a
black frame sits at its box limit whatever its neighbours' contrast. Given the true shapes
of the 624 PneumoniaMNIST test images, the images come back at 34.2 dB on average with the
population's RMS, 39.7 dB voting on the RMS, 40.3 dB voting on the fraction (the one with
a black frame: 11.5, 13.5 and 22.7 dB); tests/gradient_leakage/test_contrast.py keeps the
vote ahead of the population's RMS.
"""

from __future__ import annotations

import torch

__all__ = ["ContrastPrior"]


class ContrastPrior:
    """Estimate each image's RMS deviation from ``center`` by its nearest reference shapes.

    ``references`` are images in the pixel space the attack reconstructs, shaped
    ``(M, ...)``, inside ``box``; ``k`` neighbours vote. References with no deviation at
    all (flat images) carry no shape and are left out. The box limit is read at the
    ``tail`` and ``1 - tail`` quantiles of the shape, not its extremes, so a few noisy
    pixels of a reconstruction do not decide it.
    """

    def __init__(
        self,
        references: torch.Tensor,
        center: float,
        *,
        k: int = 10,
        box: tuple[float, float] = (0.0, 1.0),
        tail: float = 0.005,
    ) -> None:
        if references.dim() < 2 or references.shape[0] < 1:
            raise ValueError(
                f"references: expected (M, ...) with M >= 1, got {tuple(references.shape)}"
            )
        shapes, rms = _unit_deviation(references.detach().to(torch.float64).flatten(1), center)
        keep = rms > 0
        if int(keep.sum()) < k or k < 1:
            raise ValueError(
                f"k={k}: need 1 <= k <= the {int(keep.sum())} references with any contrast"
            )
        if not box[0] < center < box[1]:
            raise ValueError(f"center={center} must lie inside box={box}")
        if not 0 <= tail < 0.5:
            raise ValueError(f"tail={tail} must be in [0, 0.5)")
        self.center = center
        self.k = k
        self.box = box
        self.tail = tail
        self.image_shape = tuple(references.shape[1:])
        self._shapes = shapes[keep]
        self._log_fraction = (rms[keep] / self._box_limit(self._shapes)).log()

    def estimate(self, images: torch.Tensor) -> torch.Tensor:
        """RMS deviation from ``center`` per image, (N,), from the shape alone: any image on
        the same ray ``center + a * (x - center)`` gets the same estimate."""
        flat = self._flatten(images)
        shapes, _ = _unit_deviation(flat, self.center)
        # Shapes have unit RMS, so the dot product over D pixels is D times the cosine.
        similarity = shapes @ self._shapes.T
        nearest = similarity.topk(self.k, dim=1).indices
        return self._box_limit(shapes) * self._log_fraction[nearest].mean(dim=1).exp()

    def _box_limit(self, shapes: torch.Tensor) -> torch.Tensor:
        """The largest RMS at which each unit shape's tail quantiles stay inside the box."""
        low = torch.quantile(shapes, self.tail, dim=1).clamp(max=-1e-9)
        high = torch.quantile(shapes, 1 - self.tail, dim=1).clamp(min=1e-9)
        return torch.minimum((self.box[0] - self.center) / low, (self.box[1] - self.center) / high)

    def apply(
        self, images: torch.Tensor, box: tuple[float, float] | None = (0.0, 1.0)
    ) -> torch.Tensor:
        """``images`` moved along their contrast rays to the estimated RMS, then clamped to
        ``box`` (pass None to skip). Flat images (no deviation, so no shape) come back
        unchanged."""
        flat = self._flatten(images)
        shapes, rms = _unit_deviation(flat, self.center)
        out = torch.where(
            (rms > 0)[:, None], self.center + shapes * self.estimate(images)[:, None], flat
        )
        if box is not None:
            out = out.clamp(box[0], box[1])
        return out.reshape(images.shape).to(images.dtype)

    def _flatten(self, images: torch.Tensor) -> torch.Tensor:
        if tuple(images.shape[1:]) != self.image_shape:
            raise ValueError(
                f"images of shape {tuple(images.shape[1:])}, references of {self.image_shape}"
            )
        return images.detach().to(torch.float64).flatten(1)


def _unit_deviation(flat: torch.Tensor, center: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(deviation / its RMS, the RMS) per row; rows without deviation get a zero shape."""
    deviation = flat - center
    rms = deviation.pow(2).mean(dim=1).sqrt()
    shapes = deviation / torch.where(rms > 0, rms, torch.ones_like(rms))[:, None]
    return shapes, rms
