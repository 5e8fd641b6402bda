"""Diffusion models for images, without Ray: the class-conditioned UNet we train, pipeline
directories, and sampling for ours and for any diffusers text-to-image pipeline.

A directory we write is a diffusers ``DDPMPipeline`` (``model_index.json``, ``unet/``,
``scheduler/``: ``diffusers.DDPMPipeline.from_pretrained`` loads it without aigc_ray) plus
``labels.json`` naming the classes. Its UNet takes ``class_labels``; the extra last class is the
unconditional one that classifier-free guidance needs.
"""

from __future__ import annotations

import functools
import io
import json
import logging
from pathlib import Path

import numpy as np
import torch

from aigc_ray.config import ImageModelConfig
from aigc_ray.errors import AigcRayError

log = logging.getLogger(__name__)

LABELS_FILE = "labels.json"


class ImageModelError(AigcRayError, ValueError):
    """A directory that is not an image pipeline we can load, naming what is missing."""


class ImageRequestError(AigcRayError, ValueError):
    """A request this model cannot do (unknown class, unsupported size); ``param`` names the
    field, for the API's 400."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


def is_image_model_dir(path: str | Path) -> bool:
    """A diffusers pipeline directory (model_index.json), as opposed to a causal LM's; local or
    s3:// / gs://."""
    from aigc_ray.storage import is_uri, read_bytes

    if is_uri(path):
        try:
            read_bytes(f"{str(path).rstrip('/')}/model_index.json")
            return True
        except OSError:
            return False
    return (Path(path) / "model_index.json").is_file()


def build_unet(cfg: ImageModelConfig, image_size: int, channels: int, num_classes: int):
    """A class-conditioned UNet2DModel; class ``num_classes`` is 'no class' (guidance)."""
    from diffusers import UNet2DModel

    levels = len(cfg.block_out_channels)
    down = ["DownBlock2D"] * levels
    up = ["UpBlock2D"] * levels
    if cfg.attention:
        down[-1], up[0] = "AttnDownBlock2D", "AttnUpBlock2D"
    groups = min(8, *cfg.block_out_channels)
    return UNet2DModel(
        sample_size=image_size,
        in_channels=channels,
        out_channels=channels,
        layers_per_block=cfg.layers_per_block,
        block_out_channels=tuple(cfg.block_out_channels),
        down_block_types=tuple(down),
        up_block_types=tuple(up),
        num_class_embeds=num_classes + 1,
        norm_num_groups=groups,
    )


def noise_scheduler(num_train_timesteps: int):
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=num_train_timesteps)


def save_pipeline(unet, scheduler, labels: list[str], directory: str | Path) -> None:
    """Write a diffusers DDPMPipeline directory (DDIM scheduler for few-step sampling) plus
    labels.json."""
    from diffusers import DDIMScheduler, DDPMPipeline

    ddim = DDIMScheduler.from_config(scheduler.config)
    DDPMPipeline(unet=unet, scheduler=ddim).save_pretrained(str(directory))
    meta = {
        "labels": list(labels),
        "image_size": unet.config.sample_size,
        "channels": unet.config.in_channels,
        "null_class": len(labels),
    }
    (Path(directory) / LABELS_FILE).write_text(json.dumps(meta, indent=1) + "\n")


def check_image_model_dir(path: str) -> None:
    from aigc_ray.storage import is_uri

    if not is_uri(path) and not Path(path).is_dir():
        raise ImageModelError(f"model directory not found: {path}")
    if not is_image_model_dir(path):
        raise ImageModelError(
            f"{path} is not a diffusers pipeline directory (no model_index.json): train one with "
            "`aigc-ray pipeline --config configs/digits.yaml` or point at a saved pipeline"
        )


def _torch_dtype(dtype: str, device: str) -> torch.dtype:
    if dtype == "auto":
        return torch.float16 if device.startswith("cuda") else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


class ImagePipeline:
    """One loaded image model: ours (class-conditioned: a prompt names a class) or any diffusers
    text-to-image pipeline (the prompt goes to its text encoder). ``generate`` returns uint8
    HxWxC arrays; image i is a function of seeds[i] only, whatever else is in the batch."""

    def __init__(self, model_dir: str, device: str = "cpu", dtype: str = "auto"):
        from aigc_ray.storage import local_model_dir

        check_image_model_dir(model_dir)
        model_dir = local_model_dir(model_dir)  # s3:// -> this node's cache
        self.device, self.dtype = device, _torch_dtype(dtype, device)
        meta_path = Path(model_dir) / LABELS_FILE
        if meta_path.is_file():
            from diffusers import DDIMScheduler, UNet2DModel

            unet = UNet2DModel.from_pretrained(
                f"{model_dir}/unet", dtype=self.dtype, local_files_only=True
            )
            scheduler = DDIMScheduler.from_pretrained(f"{model_dir}/scheduler")
            labels = json.loads(meta_path.read_text())["labels"]
            self._use_class_model(unet.to(device).eval(), scheduler, labels)
        else:
            from diffusers import DiffusionPipeline

            self.kind = "text"
            self.labels = None
            self.pipe = DiffusionPipeline.from_pretrained(
                model_dir, dtype=self.dtype, local_files_only=True
            )
            self.pipe.to(device)
            self.pipe.set_progress_bar_config(disable=True)
            unet = getattr(self.pipe, "unet", None) or self.pipe.transformer
            scale = getattr(self.pipe, "vae_scale_factor", 1)
            side = unet.config.sample_size * scale
            self.native = (side, side)
            self.channels = 3

    @classmethod
    def from_unet(cls, unet, scheduler, labels: list[str]) -> ImagePipeline:
        """Our sampler over an in-memory class-conditioned UNet (training's sample grids), with
        the DDIM scheduler an exported directory gets, on the UNet's device and dtype."""
        from diffusers import DDIMScheduler

        pipe = cls.__new__(cls)
        param = next(unet.parameters())
        pipe.device, pipe.dtype = param.device, param.dtype
        pipe._use_class_model(unet, DDIMScheduler.from_config(scheduler.config), labels)
        return pipe

    def _use_class_model(self, unet, scheduler, labels: list[str]) -> None:
        self.kind, self.pipe = "class", None
        self.unet, self.scheduler = unet, scheduler
        self.labels: list[str] | None = list(labels)
        self.null_class = len(labels)  # the extra "no class" embedding (guidance)
        self.channels = unet.config.in_channels
        self.native = (unet.config.sample_size, unet.config.sample_size)

    @property
    def sizes(self) -> list[str]:
        """Sizes a request may ask, as OpenAI's 'WIDTHxHEIGHT'."""
        w, h = self.native
        return [f"{w}x{h}"]

    def check(self, prompt: str, size: str | None) -> None:
        """Raise ImageRequestError for a class this model does not know or a size it cannot do."""
        if size is not None and size not in self.sizes:
            raise ImageRequestError(
                f"size {size!r} is not supported by this model; supported: {self.sizes}", "size"
            )
        if self.labels is not None and prompt.strip() not in self.labels:
            raise ImageRequestError(
                f"unknown class: the prompt must be one of {self.labels}", "prompt"
            )

    @torch.inference_mode()
    def generate(
        self, prompts: list[str], seeds: list[int], steps: int, guidance: float
    ) -> list[np.ndarray]:
        """One batched denoising run; a prompt per image, a seed per image."""
        if self.pipe is not None:
            gens = [torch.Generator(self.device).manual_seed(int(s)) for s in seeds]
            out = self.pipe(
                prompt=list(prompts),
                num_inference_steps=steps,
                guidance_scale=guidance,
                generator=gens,
                output_type="np",
            ).images
            return [(np.clip(img, 0, 1) * 255).round().astype(np.uint8) for img in out]
        labels = torch.tensor([self.labels.index(p.strip()) for p in prompts], device=self.device)
        x = self._noise(seeds)
        sched = self._fresh_scheduler()
        sched.set_timesteps(steps)
        null = torch.full_like(labels, self.null_class)
        for t in sched.timesteps:
            if guidance > 0 and guidance != 1:
                eps = self.unet(torch.cat([x, x]), t, class_labels=torch.cat([labels, null])).sample
                cond, uncond = eps.chunk(2)
                eps = uncond + guidance * (cond - uncond)
            else:
                eps = self.unet(x, t, class_labels=labels).sample
            x = sched.step(eps, t, x).prev_sample
        img = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return list(img.permute(0, 2, 3, 1).cpu().numpy())

    def _noise(self, seeds: list[int]) -> torch.Tensor:
        h, w = self.native
        shape = (1, self.channels, h, w)
        parts = [torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
        return torch.cat(parts).to(self.device, self.dtype)

    def _fresh_scheduler(self):
        """Schedulers keep per-run state: one per call, so concurrent calls cannot mix."""
        return type(self.scheduler).from_config(self.scheduler.config)


def png_bytes(image: np.ndarray) -> bytes:
    from PIL import Image

    arr = image[..., 0] if image.shape[-1] == 1 else image
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    from PIL import Image

    arr = np.asarray(Image.open(io.BytesIO(data)))
    return arr[..., None] if arr.ndim == 2 else arr


def image_grid(images: list[np.ndarray], columns: int, scale: int = 1) -> np.ndarray:
    """Tile equally sized HxWxC images into one array, row-major, upscaled by `scale`."""
    h, w, c = images[0].shape
    rows = -(-len(images) // columns)
    grid = np.zeros((rows * h, columns * w, c), dtype=np.uint8)
    for i, img in enumerate(images):
        r, col = divmod(i, columns)
        grid[r * h : (r + 1) * h, col * w : (col + 1) * w] = img
    return grid.repeat(scale, 0).repeat(scale, 1) if scale > 1 else grid


DIGITS_HELD_OUT_EVERY = 5  # every fifth of scikit-learn's 1,797 digits is held out


def digits_split() -> tuple[np.ndarray, np.ndarray]:
    """(fit, held out): indices into scikit-learn's digits. The classifier that scores generated
    digits is fit on the first only; the second (every fifth digit, 359 of 1,797, all classes)
    is what its own accuracy is measured on."""
    index = np.arange(1797)
    held = index % DIGITS_HELD_OUT_EVERY == DIGITS_HELD_OUT_EVERY - 1
    return index[~held], index[held]


@functools.lru_cache(maxsize=1)
def digits_classifier():
    """An RBF SVM fit on the ``fit`` part of digits_split (8x8 images, 0..16 per pixel)."""
    from sklearn.datasets import load_digits
    from sklearn.svm import SVC

    digits = load_digits()
    fit, _ = digits_split()
    return SVC(gamma=0.001).fit(digits.data[fit], digits.target[fit])


def digits_accuracy(images: list[np.ndarray], labels: list[str]) -> float:
    """Share of generated digits that a classifier fit on scikit-learn's real digits
    (digits_classifier) labels as the class asked for (images are averaged down to the digits'
    8x8, 0..16 scale)."""
    t = torch.tensor(np.stack([img[..., :1] for img in images]), dtype=torch.float32)
    small = torch.nn.functional.adaptive_avg_pool2d(t.permute(0, 3, 1, 2), 8)
    feats = (small[:, 0] / 255 * 16).reshape(len(images), 64).numpy()
    predicted = digits_classifier().predict(feats)
    return float(np.mean([str(p) == str(y) for p, y in zip(predicted, labels, strict=True)]))
