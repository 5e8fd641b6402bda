"""Image generation: the data -> train -> serve -> batch flow for diffusion models.

``data`` (Ray Data: images -> parquet shards), ``train`` (TorchTrainer: class-conditioned UNet),
``model`` (pipeline directories and sampling, no Ray), ``generate`` (batch generation), ``flow``
(the pipeline command). Serving is in ``aigc_ray.serve.images``.
"""

from aigc_ray.images.model import (
    ImageModelError,
    ImagePipeline,
    ImageRequestError,
    digits_accuracy,
    image_grid,
    is_image_model_dir,
    save_pipeline,
)

__all__ = [
    "ImageModelError",
    "ImagePipeline",
    "ImageRequestError",
    "digits_accuracy",
    "image_grid",
    "is_image_model_dir",
    "save_pipeline",
]
