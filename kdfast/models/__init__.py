"""Models by name: ``create_model("resnet18")``. Importing this package registers them all."""
from . import mobile, resnet, vgg, vit, wrn  # noqa: F401  (registration)
from .registry import count_parameters, create_model, list_models, model_entry, plain_module, register_model

__all__ = ["count_parameters", "create_model", "list_models", "model_entry", "plain_module", "register_model"]
